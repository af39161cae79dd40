package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
)

func register(ctx context.Context, args []string, s streams) error {
	f := newFlags("register", "register [flags] KEY", `
Store fresh tokens for the credential KEY and how to refresh them. The first
registration and every later one (how a person repairs needs_reauth after a
new login) publish auth.rotated and schedule the proactive refresh. Nothing
calls the token endpoint now.

Give the tokens as the token endpoint returned them, in a file or on stdin:
  publisher register --token-file - --token-endpoint URL --client-id ID KEY < token.json
The file is a JSON object with access_token, token_type, refresh_token and
the expiry as expires_in (seconds from now: use it only on a fresh response),
expiry (RFC 3339, as x/oauth2 writes its Token) or expires_at (RFC 3339 or
Unix seconds, as Python libraries write it); an absolute expiry wins over
expires_in, which a saved token carries from when it was received. Other
fields (id_token, scope, …) are ignored. The file's fields win over the
token flags. Prefer the file or the environment to flags for secrets: flags
show in ps.`, s)
	var req events.RegisterRequest
	var scopes cli.StringList
	var tokenPath, expiresAt string
	defineRegisterFlags(f, &req, &scopes)
	f.StringVar(&tokenPath, "token-file", "", "token response JSON from `FILE`, or - for stdin")
	f.bind("token-file", "AUTHBUS_TOKEN_FILE")
	f.StringVar(&req.Token.AccessToken, "access-token", "", "access token (prefer --token-file or the environment)")
	f.bind("access-token", "AUTHBUS_ACCESS_TOKEN")
	f.StringVar(&req.Token.RefreshToken, "refresh-token", "", "refresh token (prefer --token-file or the environment)")
	f.bind("refresh-token", "AUTHBUS_REFRESH_TOKEN")
	f.StringVar(&req.Token.TokenType, "token-type", "", "token type (default Bearer)")
	f.Int64Var(&req.Token.ExpiresIn, "expires-in", 0, "access token lifetime in `seconds` from now")
	f.StringVar(&expiresAt, "expires-at", "", "absolute access token expiry, RFC 3339")
	asJSON := registerJSONFlag(f)
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	req.Scopes = scopes
	if expiresAt != "" {
		t, err := time.Parse(time.RFC3339, expiresAt)
		if err != nil {
			return usageErrorf("--expires-at %q: not RFC 3339; write it like 2026-11-23T20:00:00Z", expiresAt)
		}
		req.Token.ExpiresAt = t
	}
	if tokenPath != "" {
		raw, err := readInput(tokenPath, s.in, events.MaxRegisterSize)
		if err != nil {
			return err
		}
		if err := mergeTokenFile(raw, &req.Token); err != nil {
			return usageErrorf("--token-file %s: %w", tokenPath, err)
		}
	}
	// Checked here too, so a typo is reported before anything is sent.
	if err := checkRegister(req); err != nil {
		return usageErrorf("%w; see \"publisher register --help\"", err)
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	reply, err := c.register(ctx, key, req)
	if err != nil {
		return err
	}
	return printRegistered(s, key, reply, *asJSON)
}

// defineRegisterFlags defines the flags that say how a credential is
// refreshed, shared by register and import: the token endpoint or issuer,
// the client, the grant, scopes and resource.
func defineRegisterFlags(f *cmdFlags, req *events.RegisterRequest, scopes *cli.StringList) {
	f.StringVar(&req.TokenEndpoint, "token-endpoint", "", "OAuth token endpoint URL (https, or http on loopback)")
	f.bind("token-endpoint", "AUTHBUS_TOKEN_ENDPOINT")
	defineClientFlags(f, req, scopes, "authorization server issuer; its token endpoint is found by RFC 8414 discovery (instead of --token-endpoint)")
	f.StringVar(&req.Grant, "grant", "", "refresh_token or client_credentials (default refresh_token)")
	f.bind("grant", "AUTHBUS_GRANT")
}

// checkRegister checks a register request as the refresher will, so that a
// mistake is reported before anything is sent. Its errors name fields,
// never values.
func checkRegister(req events.RegisterRequest) error { return req.Validate() }

// defineClientFlags defines the flags that say how a credential is
// refreshed, which register, import and login share: the issuer (its usage differs
// per command), the client and its authentication, scopes and resource.
func defineClientFlags(f *cmdFlags, req *events.RegisterRequest, scopes *cli.StringList, issuerUsage string) {
	f.StringVar(&req.Issuer, "issuer", "", issuerUsage)
	f.bind("issuer", "AUTHBUS_ISSUER")
	f.StringVar(&req.ClientID, "client-id", "", "OAuth client id the tokens were issued to")
	f.bind("client-id", "AUTHBUS_CLIENT_ID")
	f.StringVar(&req.ClientSecret, "client-secret", "", "OAuth client secret, for confidential clients (prefer the environment)")
	f.bind("client-secret", "AUTHBUS_CLIENT_SECRET")
	f.StringVar(&req.AuthStyle, "auth-style", "", "client authentication: basic or post (default: from discovery metadata, else basic)")
	f.bind("auth-style", "AUTHBUS_AUTH_STYLE")
	f.Var(scopes, "scope", "scope to request on refresh (repeatable, or comma-separated)")
	f.bind("scope", "AUTHBUS_SCOPE")
	f.StringVar(&req.Resource, "resource", "", "RFC 8707 resource indicator sent on refresh (MCP servers require it)")
	f.bind("resource", "AUTHBUS_RESOURCE")
}

func registerJSONFlag(f *cmdFlags) *bool {
	return f.Bool("json", false, "print the reply (version, fingerprint, expires_at) as JSON")
}

// register sends req on auth.register.KEY and returns the reply: the one
// way register, import and login store tokens.
func (c *client) register(ctx context.Context, key events.Key, req events.RegisterRequest) (events.RegisterReply, error) {
	var reply events.RegisterReply
	body, err := json.Marshal(req)
	if err != nil {
		return reply, err
	}
	err = c.request(ctx, "register", key, body, &reply)
	return reply, err
}

// printRegistered prints a register reply, as a line or as JSON.
func printRegistered(s streams, key events.Key, reply events.RegisterReply, asJSON bool) error {
	if asJSON {
		return writeJSON(s, reply)
	}
	exp := "never"
	if !reply.ExpiresAt.IsZero() {
		exp = reply.ExpiresAt.UTC().Format(time.RFC3339)
	}
	_, err := fmt.Fprintf(s.out, "registered %s: version %d, fingerprint %s, expires %s\n", key, reply.Version, reply.Fingerprint, exp)
	return err
}

// readInput reads path, or stdin for "-", refusing more than limit bytes.
func readInput(path string, stdin io.Reader, limit int) ([]byte, error) {
	r := stdin
	if path != "-" {
		file, err := os.Open(path)
		if err != nil {
			return nil, usageErrorf("--token-file: %w", err)
		}
		defer file.Close()
		r = file
	}
	raw, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("--token-file %s: %w", path, err)
	case len(raw) > limit:
		return nil, usageErrorf("--token-file %s: longer than %d bytes; give the token response JSON", path, limit)
	case len(bytes.TrimSpace(raw)) == 0:
		return nil, usageErrorf("--token-file %s: empty; give the token response JSON (for -, on stdin)", path)
	}
	return raw, nil
}

// tokenFile is a token response as OAuth libraries save it: RFC 6749 §5.1
// fields, x/oauth2's absolute "expiry", and "expires_at" as RFC 3339 or as
// Unix seconds (Python's requests-oauthlib and Authlib). Numbers may come
// as strings: some servers send "expires_in":"3600".
type tokenFile struct {
	AccessToken  string          `json:"access_token"`
	TokenType    string          `json:"token_type"`
	RefreshToken string          `json:"refresh_token"`
	ExpiresIn    json.RawMessage `json:"expires_in"`
	Expiry       time.Time       `json:"expiry"`
	ExpiresAt    json.RawMessage `json:"expires_at"`
}

// mergeTokenFile fills t from a token response; the file's fields replace
// those set by flags.
func mergeTokenFile(raw []byte, t *events.RegisterToken) error {
	var f tokenFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return fmt.Errorf("not a token response JSON object (access_token, refresh_token, expires_in…): %w", err)
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
	expiresAt, err := absoluteExpiry(f.ExpiresAt)
	if err != nil {
		return err
	}
	if expiresAt.IsZero() {
		expiresAt = f.Expiry // x/oauth2 writes the zero time for "no expiry"
	}
	expiresIn, err := seconds("expires_in", f.ExpiresIn)
	if err != nil {
		return err
	}
	// An absolute expiry is right whenever the file was written; expires_in
	// is relative to when the response was received, which only a fresh
	// response makes "now".
	switch {
	case !expiresAt.IsZero():
		t.ExpiresAt, t.ExpiresIn = expiresAt, 0
	case expiresIn > 0:
		t.ExpiresAt, t.ExpiresIn = time.Time{}, expiresIn
	}
	return nil
}

// absoluteExpiry reads expires_at: an RFC 3339 string or Unix seconds.
func absoluteExpiry(raw json.RawMessage) (time.Time, error) {
	if isAbsent(raw) {
		return time.Time{}, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if t, err := time.Parse(time.RFC3339, s); err == nil {
			return t, nil
		}
	}
	sec, err := seconds("expires_at", raw)
	if err != nil || sec <= 0 {
		return time.Time{}, fmt.Errorf("expires_at %s: want an RFC 3339 time or Unix seconds", raw)
	}
	return time.Unix(sec, 0).UTC(), nil
}

// seconds reads a whole number of seconds given as a JSON number (possibly
// fractional, as Python writes time.time()) or a numeric string.
func seconds(field string, raw json.RawMessage) (int64, error) {
	if isAbsent(raw) {
		return 0, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		raw = json.RawMessage(s)
	}
	v, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || v < 0 || v > math.MaxInt32*100 {
		return 0, fmt.Errorf("%s %s: want a non-negative number of seconds", field, raw)
	}
	return int64(math.Ceil(v)), nil
}

func isAbsent(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null" || string(raw) == `""`
}
