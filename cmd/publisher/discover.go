package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/authbus/authbus/workers/discovery"
)

// httpTimeout bounds each call the publisher makes to an authorization
// server itself (metadata, code exchange, device polls, revocation).
const httpTimeout = 30 * time.Second

// discover looks up issuer's metadata with the refreshers' own discovery,
// so that login, revoke and register --issuer agree on which document
// counts. No egress policy applies: the publisher calls the person's own
// authorization server, which may well be on loopback (the development
// server).
func discover(ctx context.Context, hc *http.Client, issuer string) (discovery.Metadata, error) {
	md, err := discovery.NewResolver(discovery.Config{HTTPClient: hc}).Lookup(ctx, issuer)
	if errors.Is(err, discovery.ErrIssuerMetadata) {
		return discovery.Metadata{}, usageErrorf("--issuer: %w", err)
	}
	if err != nil {
		return discovery.Metadata{}, fmt.Errorf("--issuer: %w", err)
	}
	return md, nil
}

// checkEndpoint applies the rule of register's token_endpoint
// (discovery.EndpointProblem) to another endpoint the publisher sends a
// client secret or a token to.
func checkEndpoint(field, s string) error {
	if p := discovery.EndpointProblem(s); p != "" {
		return usageErrorf("%s %q %s; give one such as https://auth.example.com/oauth/revoke", field, s, p)
	}
	return nil
}
