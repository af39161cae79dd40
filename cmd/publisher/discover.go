package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/workers/discovery"
)

// serverMetadata is the part of an authorization server's metadata (RFC
// 8414 §2) that login and revoke use: what the refreshers' discovery keeps,
// and the endpoints a person's login and a revocation need.
type serverMetadata struct {
	discovery.Metadata
	AuthorizationEndpoint       string `json:"authorization_endpoint"`
	DeviceAuthorizationEndpoint string `json:"device_authorization_endpoint"`
	RevocationEndpoint          string `json:"revocation_endpoint"`
}

// httpTimeout bounds each call the publisher makes to an authorization
// server itself (metadata, code exchange, device polls, revocation).
const httpTimeout = 30 * time.Second

// discover looks up issuer's metadata the way the refreshers do for a
// registration with an issuer (package discovery: the RFC 8414 location,
// then the OpenID Connect one, the issuer checked to be identical), so
// login and register agree on which document counts, and reads the other
// endpoints from the document that the Resolver accepted.
func discover(ctx context.Context, hc *http.Client, issuer string) (serverMetadata, error) {
	rec := &recordingTransport{base: hc.Transport}
	d := discovery.NewResolver(discovery.Config{HTTPClient: &http.Client{Transport: rec, Timeout: hc.Timeout}})
	md, err := d.Lookup(ctx, issuer)
	if errors.Is(err, discovery.ErrIssuerMetadata) {
		return serverMetadata{}, usageErrorf("--issuer: %w", err)
	}
	if err != nil {
		return serverMetadata{}, fmt.Errorf("--issuer: %w", err)
	}
	var full serverMetadata
	// The Resolver stops at the first usable document, so the last one
	// answered 200 is the one it accepted.
	if err := json.Unmarshal(rec.last(), &full); err != nil {
		return serverMetadata{}, fmt.Errorf("--issuer %s: metadata: %w", issuer, err)
	}
	full.Metadata = md
	return full, nil
}

// recordingTransport keeps a copy of the body of the last 200 answer, as
// it is read.
type recordingTransport struct {
	base http.RoundTripper
	mu   sync.Mutex
	body *bytes.Buffer
}

func (t *recordingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	base := t.base
	if base == nil {
		base = http.DefaultTransport
	}
	resp, err := base.RoundTrip(r)
	if err != nil || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	buf := &bytes.Buffer{}
	t.mu.Lock()
	t.body = buf
	t.mu.Unlock()
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.TeeReader(resp.Body, buf), resp.Body}
	return resp, nil
}

func (t *recordingTransport) last() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.body == nil {
		return nil
	}
	return t.body.Bytes()
}

// checkEndpoint applies the rule of register's token_endpoint to another
// endpoint the publisher sends a client secret or a token to: https, or
// plain http on loopback only.
func checkEndpoint(field, s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil || u.Hostname() == "" || u.User != nil:
		return usageErrorf("%s %q is not an absolute URL without user information; give one such as https://auth.example.com/oauth/revoke", field, s)
	case u.Scheme == "https", u.Scheme == "http" && events.IsLoopbackHost(u.Hostname()):
		return nil
	}
	return usageErrorf("%s %q is not https (plain http is allowed only on localhost, 127.0.0.0/8 and ::1)", field, s)
}
