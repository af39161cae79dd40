package authtest

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/oauth2"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	confID     = "agent"
	confSecret = "s3cr+t/=&:%x" // characters HTTP Basic must form-url-encode
	publicID   = "cli"
)

type testBundle struct {
	srv *Server
	ctx context.Context // carries srv.Client() for x/oauth2
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	srv := New(t)
	srv.AddClient(confID, confSecret)
	srv.AddClient(publicID, "")
	return &testBundle{
		srv: srv,
		ctx: context.WithValue(t.Context(), oauth2.HTTPClient, srv.Client()),
	}
}

func (b *testBundle) config(id, secret string, style oauth2.AuthStyle) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     id,
		ClientSecret: secret,
		Endpoint:     oauth2.Endpoint{TokenURL: b.srv.TokenURL(), AuthStyle: style},
	}
}

func (b *testBundle) basic() *oauth2.Config {
	return b.config(confID, confSecret, oauth2.AuthStyleInHeader)
}

// refresh forces one refresh_token grant call, as the refresher makes it.
func refresh(ctx context.Context, cfg *oauth2.Config, rt string) (*oauth2.Token, error) {
	return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token()
}

func mustRefresh(t *testing.T, ctx context.Context, cfg *oauth2.Config, rt string) *oauth2.Token {
	t.Helper()
	tok, err := refresh(ctx, cfg, rt)
	if err != nil {
		t.Fatalf("refresh %s: %v", rt, err)
	}
	return tok
}

// wantAnswer checks that err is the token endpoint's answer with this status
// and OAuth error code ("" for none).
func wantAnswer(t *testing.T, err error, status int, code string) *oauth2.RetrieveError {
	t.Helper()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		t.Fatalf("got error %v, want a token endpoint answer %d %q", err, status, code)
	}
	if re.Response.StatusCode != status || re.ErrorCode != code {
		t.Fatalf("got answer %d %q (%s), want %d %q", re.Response.StatusCode, re.ErrorCode, re.ErrorDescription, status, code)
	}
	return re
}

// wantTransportError checks that err is a failed HTTP exchange, not an answer.
func wantTransportError(t *testing.T, err error) {
	t.Helper()
	var re *oauth2.RetrieveError
	var ue *url.Error
	if errors.As(err, &re) || !errors.As(err, &ue) {
		t.Fatalf("got error %v (%T), want a transport error", err, err)
	}
}

// post sends a raw request to the token endpoint, for what x/oauth2 cannot
// send or hides (it fills in a missing refresh_token, for one).
func (b *testBundle) post(t *testing.T, method string, form url.Values, auth func(*http.Request)) (*http.Response, map[string]any) {
	t.Helper()
	req, err := http.NewRequestWithContext(b.ctx, method, b.srv.TokenURL(), strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if auth != nil {
		auth(req)
	}
	resp, err := b.srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, req.URL, err)
	}
	defer resp.Body.Close()
	var body map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatalf("decode answer: %v", err)
	}
	return resp, body
}

func confForm(kv ...string) url.Values {
	f := url.Values{"client_id": {confID}, "client_secret": {confSecret}}
	for i := 0; i+1 < len(kv); i += 2 {
		f.Set(kv[i], kv[i+1])
	}
	return f
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}
