package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
)

// tokenFile is a token response as OAuth libraries write it: RFC 6749 §5.1
// fields, plus x/oauth2's absolute "expiry".
type tokenFile struct {
	AccessToken  string    `json:"access_token"`
	TokenType    string    `json:"token_type"`
	RefreshToken string    `json:"refresh_token"`
	ExpiresIn    int64     `json:"expires_in"`
	Expiry       time.Time `json:"expiry"`
	ExpiresAt    time.Time `json:"expires_at"`
}

func register(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var c conn
	var req events.RegisterRequest
	var scopes cli.StringList
	var tokenPath, expiresAt string
	var asJSON bool
	fs, env := newFlagSet("register", "register [flags] KEY", stderr, &c)
	fs.StringVar(&req.TokenEndpoint, "token-endpoint", "", "OAuth token endpoint URL (https, or http on loopback)")
	env.Bind("token-endpoint", "AUTHBUS_TOKEN_ENDPOINT")
	fs.StringVar(&req.ClientID, "client-id", "", "OAuth client id")
	env.Bind("client-id", "AUTHBUS_CLIENT_ID")
	fs.StringVar(&req.ClientSecret, "client-secret", "", "OAuth client secret (prefer the environment: flags show in ps)")
	env.Bind("client-secret", "AUTHBUS_CLIENT_SECRET")
	fs.StringVar(&req.AuthStyle, "auth-style", "", "client authentication: basic or post (default basic)")
	fs.StringVar(&req.Grant, "grant", "", "refresh_token or client_credentials (default refresh_token)")
	fs.Var(&scopes, "scope", "scope to request on refresh (repeatable, or comma-separated)")
	fs.StringVar(&req.Resource, "resource", "", "RFC 8707 resource indicator sent on refresh")
	fs.StringVar(&tokenPath, "token-file", "", "token response JSON (access_token, refresh_token, expires_in…) from FILE, or - for stdin")
	fs.StringVar(&req.Token.AccessToken, "access-token", "", "access token (prefer --token-file or the environment)")
	env.Bind("access-token", "AUTHBUS_ACCESS_TOKEN")
	fs.StringVar(&req.Token.RefreshToken, "refresh-token", "", "refresh token (prefer --token-file or the environment)")
	env.Bind("refresh-token", "AUTHBUS_REFRESH_TOKEN")
	fs.StringVar(&req.Token.TokenType, "token-type", "", "token type (default Bearer)")
	fs.Int64Var(&req.Token.ExpiresIn, "expires-in", 0, "access token lifetime in seconds from now")
	fs.StringVar(&expiresAt, "expires-at", "", "absolute access token expiry, RFC 3339")
	fs.BoolVar(&asJSON, "json", false, "print the reply as JSON")
	if err := c.parse(env, args); err != nil {
		return err
	}
	key, err := keyArg(fs)
	if err != nil {
		return err
	}
	req.Scopes = scopes
	if tokenPath != "" {
		if err := readTokenFile(tokenPath, stdin, &req.Token); err != nil {
			return err
		}
	}
	if expiresAt != "" {
		t, err := time.Parse(time.RFC3339, expiresAt)
		if err != nil {
			return fmt.Errorf("--expires-at %q: %w; use RFC 3339, e.g. 2026-11-23T20:00:00Z", expiresAt, err)
		}
		req.Token.ExpiresAt = t
	}
	// Check here too, so a typo is reported before anything is sent.
	if err := req.Validate(); err != nil {
		return err
	}
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	var reply events.RegisterReply
	if err := c.request(context.Background(), nc, c.subj.Register(key), body, &reply); err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(stdout).Encode(reply)
	}
	exp := "never"
	if !reply.ExpiresAt.IsZero() {
		exp = reply.ExpiresAt.Format(time.RFC3339)
	}
	fmt.Fprintf(stdout, "registered %s: version %d, fingerprint %s, expires %s\n", key, reply.Version, reply.Fingerprint, exp)
	return nil
}

// readTokenFile fills t from a token response file; flags given explicitly
// are overwritten only by fields the file sets.
func readTokenFile(path string, stdin io.Reader, t *events.RegisterToken) error {
	var raw []byte
	var err error
	if path == "-" {
		raw, err = io.ReadAll(io.LimitReader(stdin, events.MaxRegisterSize+1))
	} else {
		raw, err = os.ReadFile(path)
	}
	if err != nil {
		return fmt.Errorf("--token-file: %w", err)
	}
	var f tokenFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return fmt.Errorf("--token-file %s: not a token response JSON object: %w", path, err)
	}
	if f.AccessToken != "" {
		t.AccessToken = f.AccessToken
	}
	if f.TokenType != "" {
		t.TokenType = f.TokenType
	}
	if f.RefreshToken != "" {
		t.RefreshToken = f.RefreshToken
	}
	switch {
	case f.ExpiresIn > 0:
		t.ExpiresIn = f.ExpiresIn
	case !f.ExpiresAt.IsZero():
		t.ExpiresAt = f.ExpiresAt
	case !f.Expiry.IsZero():
		t.ExpiresAt = f.Expiry
	}
	return nil
}
