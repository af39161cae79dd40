// Package mcpauth connects the official MCP Go SDK
// (github.com/modelcontextprotocol/go-sdk) to authbus: Handler is the SDK's
// client OAuth handler (auth.OAuthHandler) backed by a client.Source, so an
// MCP client's sessions send the token the refreshers keep fresh, and a
// 401 from the MCP server is answered by one refresh for every session,
// process and machine that shares the credential.
//
//	src, err := client.New(nc, "acme.alice.github")
//	defer src.Close()
//	transport := &mcp.StreamableClientTransport{Endpoint: url, OAuthHandler: mcpauth.New(src)}
//	session, err := mcp.NewClient(impl, nil).Connect(ctx, transport, nil)
//
// It lives in its own package so that the core client does not depend on
// the SDK. Checked against go-sdk v1.8.0, whose StreamableClientTransport
// calls TokenSource for every HTTP request and Authorize once when a
// request gets 401 or 403, then replays the request.
package mcpauth

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/oauthex"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
)

// ErrInsufficientScope is wrapped by the error Authorize returns when the
// MCP server answers 403 with error="insufficient_scope": the credential
// was not granted what the server asks for, and a refresh keeps the same
// scopes, so authbus reports nothing. Log in again with the scopes the
// server names and register the new tokens.
var ErrInsufficientScope = errors.New("insufficient scope")

// maxDrain bounds how much of a refused response body is read so its
// connection can be reused.
const maxDrain = 64 << 10

// Handler is an auth.OAuthHandler whose tokens come from a client.Source.
// Give the same Handler, or Handlers of the same Source, to every session
// of the credential. It is safe for concurrent use.
type Handler struct {
	src *client.Source
}

var _ auth.OAuthHandler = (*Handler)(nil)

// New returns a Handler over src, which it uses but does not own: close
// src after the sessions that use the Handler.
func New(src *client.Source) *Handler { return &Handler{src: src} }

// TokenSource returns the Source's tokens, as the SDK asks before every
// request. Its Token answers from the Source's local copy, which
// auth.rotated events keep current. While the credential needs a new
// login, Token fails with a *ReauthError, which the SDK, like an
// invalid_grant refresh of its own handlers, answers by sending the
// request without a token and calling Authorize on the 401.
func (h *Handler) TokenSource(context.Context) (oauth2.TokenSource, error) {
	return tokenSource{h.src}, nil
}

type tokenSource struct{ src *client.Source }

func (ts tokenSource) Token() (*oauth2.Token, error) {
	tok, err := ts.src.Token()
	return tok, reauth(err)
}

// Authorize is what the SDK calls when a request got 401 or 403; it closes
// resp's body. It runs the protocol's recipe for the refused token (the
// one the request carried): report it once for all sessions that saw it,
// ask auth.token at once, wait for the rotation otherwise (see
// client.Source.Renew). It returns nil once a new token is in force, and
// the SDK replays the request with it.
//
// Errors: a *ReauthError when only a person can repair the credential; one
// wrapping ErrInsufficientScope for a 403 that asks for more scopes; the
// Source's errors (client.ErrTimeout, client.ErrUnavailable, …) otherwise.
// The SDK returns them, wrapped, from the call that was refused.
func (h *Handler) Authorize(ctx context.Context, req *http.Request, resp *http.Response) error {
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
	if resp.StatusCode == http.StatusForbidden && insufficientScope(resp) {
		return fmt.Errorf("mcpauth: %s answered 403 insufficient_scope for credential %s: %w; a refresh keeps the granted scopes: log in again with the scopes the server asks for and register the new tokens",
			cleanURL(req.URL), h.src.Key(), ErrInsufficientScope)
	}
	used, ok := bearer(req)
	if !ok {
		// No token was sent: the Source had none to give (it needs a new
		// login, or the token service did not answer). Ask again.
		_, err := h.src.Current(ctx)
		return reauth(err)
	}
	_, err := h.src.Renew(ctx, client.Refusal{Fingerprint: events.Fingerprint(used), Status: resp.StatusCode, URL: cleanURL(req.URL)})
	return reauth(err)
}

// bearer returns the token of req's Authorization header.
func bearer(req *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(req.Header.Get("Authorization"), " ")
	return tok, ok && strings.EqualFold(scheme, "Bearer") && tok != ""
}

// insufficientScope reports whether resp's challenge says the token lacks
// scopes (RFC 6750 §3.1).
func insufficientScope(resp *http.Response) bool {
	challenges, err := oauthex.ParseWWWAuthenticate(resp.Header.Values("WWW-Authenticate"))
	if err != nil {
		return false
	}
	for _, c := range challenges {
		if c.Scheme == "bearer" && c.Params["error"] == "insufficient_scope" {
			return true
		}
	}
	return false
}

// cleanURL is u without user info, query and fragment, which may hold
// secrets, at most events.MaxURLLen bytes, as auth.401 carries it.
func cleanURL(u *url.URL) string {
	c := *u
	c.User, c.RawQuery, c.ForceQuery, c.Fragment, c.RawFragment = nil, "", false, "", ""
	s := c.String()
	if len(s) > events.MaxURLLen {
		s = s[:events.MaxURLLen]
	}
	return s
}

// ReauthError says that the credential needs a person to log in again and
// register the new tokens. It is the error of both client.NeedsReauthError
// (errors.As finds its key, reason and version) and an *oauth2.RetrieveError
// with the code "invalid_grant", the form in which the SDK recognises a
// grant that can no longer be refreshed.
type ReauthError struct {
	*client.NeedsReauthError
	retrieve *oauth2.RetrieveError
}

// Error says what happened and what to do.
func (e *ReauthError) Error() string { return e.NeedsReauthError.Error() }

// Unwrap returns the authbus error and the OAuth error.
func (e *ReauthError) Unwrap() []error { return []error{e.NeedsReauthError, e.retrieve} }

// reauth turns a *client.NeedsReauthError into a *ReauthError and passes
// any other error through.
func reauth(err error) error {
	var nre *client.NeedsReauthError
	if !errors.As(err, &nre) {
		return err
	}
	desc := "authbus: credential " + nre.Key + " needs a new login (" + nre.Reason + ")"
	return &ReauthError{NeedsReauthError: nre, retrieve: &oauth2.RetrieveError{ErrorCode: "invalid_grant", ErrorDescription: desc}}
}
