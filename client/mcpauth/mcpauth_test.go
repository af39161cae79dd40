package mcpauth_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/goleak"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/client/mcpauth"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Idle keep-alive connections of HTTP transports end with their
		// server; the runtime may not have reaped them yet.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// bundle is an authbus installation with a registered credential, and an
// MCP server (the SDK's, behind the SDK's bearer-token middleware) that
// accepts the tokens the test authorization server considers valid.
type bundle struct {
	f   *fleet.Fleet
	key events.Key
	tok authtest.Tokens // as registered, version 1
	url string          // of the MCP endpoint

	mu        sync.Mutex
	retired   map[string]bool
	refused   int // requests answered 401
	toolCalls int
}

func setup(t *testing.T) *bundle {
	t.Helper()
	f := fleet.Setup(t)
	f.StartPools(t, 2, nil)
	b := &bundle{f: f, key: fleet.MustKey(t, "acme.alice.mcp"), retired: map[string]bool{}}
	b.tok = f.AS.Issue(fleet.ClientID)
	f.Register(t, b.key, b.tok, nil)

	server := mcp.NewServer(&mcp.Implementation{Name: "authbus-test", Version: "v0.0.1"}, nil)
	type in struct {
		Name string `json:"name"`
	}
	mcp.AddTool(server, &mcp.Tool{Name: "greet", Description: "says hello"}, func(_ context.Context, _ *mcp.CallToolRequest, args in) (*mcp.CallToolResult, any, error) {
		b.mu.Lock()
		b.toolCalls++
		b.mu.Unlock()
		return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: "hello, " + args.Name}}}, nil, nil
	})
	handler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server },
		&mcp.StreamableHTTPOptions{Logger: slog.New(slog.DiscardHandler)})
	verify := func(_ context.Context, tok string, _ *http.Request) (*auth.TokenInfo, error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.retired[tok] || !f.AS.ValidAccessToken(tok) {
			b.refused++
			return nil, fmt.Errorf("the authorization server does not accept this token: %w", auth.ErrInvalidToken)
		}
		return &auth.TokenInfo{}, nil
	}
	srv := httptest.NewServer(auth.RequireBearerToken(verify, &auth.RequireBearerTokenOptions{AllowMissingExpiration: true})(handler))
	t.Cleanup(func() {
		// A session whose credential needs a new login cannot send the
		// DELETE that ends it at the server: end them here.
		for ss := range server.Sessions() {
			_ = ss.Close()
		}
		srv.CloseClientConnections() // the sessions' event streams
		srv.Close()
	})
	b.url = srv.URL
	return b
}

// retire makes the MCP server refuse tok from now on, as it does with a
// token revoked at the authorization server or no longer fit for it.
func (b *bundle) retire(tok string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.retired[tok] = true
}

func (b *bundle) counts() (refused, toolCalls int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.refused, b.toolCalls
}

// newSource returns a Source on a connection of its own, as a runtime
// process has, closed when the test ends.
func (b *bundle) newSource(t *testing.T) *client.Source {
	t.Helper()
	src, err := client.New(natstest.Connect(t, b.f.Srv), b.key.String(), client.WithRuntime("mcp-test"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return src
}

// connect opens an MCP session with h, closed when the test ends.
func (b *bundle) connect(t *testing.T, h *mcpauth.Handler) *mcp.ClientSession {
	t.Helper()
	base := &http.Transport{}
	t.Cleanup(base.CloseIdleConnections)
	transport := &mcp.StreamableClientTransport{Endpoint: b.url, OAuthHandler: h, HTTPClient: &http.Client{Transport: base}}
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "authbus-test-client", Version: "v0.0.1"}, nil).Connect(context.Background(), transport, nil)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs
}

func greet(ctx context.Context, cs *mcp.ClientSession) (string, error) {
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "greet", Arguments: map[string]any{"name": "alice"}})
	if err != nil {
		return "", err
	}
	if res.IsError || len(res.Content) != 1 {
		return "", fmt.Errorf("tool result %+v", res)
	}
	text, _ := res.Content[0].(*mcp.TextContent)
	if text == nil {
		return "", fmt.Errorf("tool result content %T", res.Content[0])
	}
	return text.Text, nil
}

// callAll calls the tool n times from each session at once; every call
// must succeed.
func callAll(t *testing.T, sessions []*mcp.ClientSession, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i, cs := range sessions {
		for j := range n {
			wg.Go(func() {
				if got, err := greet(ctx, cs); err != nil || got != "hello, alice" {
					t.Errorf("session %d call %d: %q, %v", i, j, got, err)
				}
			})
		}
	}
	wg.Wait()
}

// An MCP client whose sessions take their tokens from authbus keeps
// working across a rotation forced by the MCP server's 401 and across an
// expiry, with one refresh each for all of its sessions, and sees a
// revoked grant as the authorization error of the SDK's OAuth handler.
func TestSessionsSurviveRotationAndExpiry(t *testing.T) {
	b := setup(t)
	h := mcpauth.New(b.newSource(t))
	var sessions []*mcp.ClientSession
	for range 3 {
		sessions = append(sessions, b.connect(t, h))
	}
	callAll(t, sessions, 1)
	if n := b.f.AS.Calls(); n != 0 {
		t.Fatalf("token-endpoint calls before any 401 = %d, want 0", n)
	}

	// Mid-session the MCP server stops accepting the token.
	b.retire(b.tok.AccessToken)
	callAll(t, sessions, 4)
	b.f.Settled(t)
	if n := b.f.AS.Calls(); n != 1 {
		t.Errorf("token-endpoint calls after the server refused the token = %d, want 1 for all sessions", n)
	}
	if refused, _ := b.counts(); refused == 0 {
		t.Fatal("the MCP server refused nothing: the test did not exercise Authorize")
	}

	// The new token expires (the authorization server's clock moves on).
	b.f.AS.SetClock(func() time.Time { return time.Now().Add(2 * time.Hour) })
	callAll(t, sessions, 4)
	b.f.Settled(t)
	if n := b.f.AS.Calls(); n != 2 {
		t.Errorf("token-endpoint calls after the expiry = %d, want 2", n)
	}
	if n := b.f.AS.Reuses(); n != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", n)
	}

	// The user revokes the grant: the next refresh ends in needs_reauth,
	// which the call returns instead of retrying.
	cur := b.f.Cred(t, b.key)
	b.f.AS.Revoke(cur.RefreshToken.Reveal())
	_, toolsBefore := b.counts()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := greet(ctx, sessions[0])
	var nre *client.NeedsReauthError
	var re *oauth2.RetrieveError
	var reauth *mcpauth.ReauthError
	if !errors.As(err, &nre) || !errors.As(err, &re) || !errors.As(err, &reauth) {
		t.Fatalf("call after revocation: %v; want a *mcpauth.ReauthError (a *client.NeedsReauthError and an *oauth2.RetrieveError)", err)
	}
	if nre.Reason != "invalid_grant" || nre.Key != b.key.String() || re.ErrorCode != "invalid_grant" {
		t.Errorf("needs-reauth error: reason %q key %q, OAuth code %q; want invalid_grant for %s", nre.Reason, nre.Key, re.ErrorCode, b.key)
	}
	for _, secret := range []string{cur.AccessToken.Reveal(), cur.RefreshToken.Reveal(), b.tok.AccessToken} {
		if strings.Contains(err.Error(), secret) {
			t.Errorf("the error shows a token: %v", err)
		}
	}
	// The other sessions learn it without another refresh.
	if _, err := greet(ctx, sessions[1]); !errors.As(err, &nre) {
		t.Errorf("another session after revocation: %v; want a *client.NeedsReauthError", err)
	}
	b.f.Settled(t)
	if n := b.f.AS.Calls(); n != 3 {
		t.Errorf("token-endpoint calls after the revocation = %d, want 3 (one failed refresh)", n)
	}
	if _, tools := b.counts(); tools != toolsBefore {
		t.Errorf("the tool ran %d times after the revocation, want 0", tools-toolsBefore)
	}
}

// A 403 that asks for scopes the credential lacks is not reported: a
// refresh keeps the same scopes.
func TestAuthorizeInsufficientScope(t *testing.T) {
	b := setup(t)
	h := mcpauth.New(b.newSource(t))
	req := httptest.NewRequest(http.MethodPost, b.url+"/mcp?sig=secret", nil)
	req.Header.Set("Authorization", "Bearer "+b.tok.AccessToken)
	rec := httptest.NewRecorder()
	rec.Header().Set("WWW-Authenticate", `Bearer error="insufficient_scope", scope="repo admin"`)
	rec.WriteHeader(http.StatusForbidden)
	err := h.Authorize(context.Background(), req, rec.Result())
	if !errors.Is(err, mcpauth.ErrInsufficientScope) || strings.Contains(err.Error(), "secret") {
		t.Fatalf("Authorize of a 403 insufficient_scope: %v; want ErrInsufficientScope, without the query", err)
	}
	b.f.Settled(t)
	if n := b.f.AS.Calls(); n != 0 {
		t.Errorf("token-endpoint calls = %d, want 0", n)
	}
}
