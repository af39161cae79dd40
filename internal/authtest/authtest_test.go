package authtest

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
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

func TestRefreshRotates(t *testing.T) {
	t.Parallel()
	for _, style := range []oauth2.AuthStyle{oauth2.AuthStyleInHeader, oauth2.AuthStyleInParams} {
		name := map[oauth2.AuthStyle]string{oauth2.AuthStyleInHeader: "basic", oauth2.AuthStyleInParams: "post"}[style]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			issued := b.srv.Issue(confID)
			tok := mustRefresh(t, b.ctx, b.config(confID, confSecret, style), issued.RefreshToken)

			if tok.AccessToken == issued.AccessToken || tok.RefreshToken == issued.RefreshToken || tok.RefreshToken == "" {
				t.Errorf("got access %q refresh %q, want new ones after %+v", tok.AccessToken, tok.RefreshToken, issued)
			}
			if tok.TokenType != "Bearer" || tok.ExpiresIn != 3600 {
				t.Errorf("got token_type %q expires_in %d, want Bearer 3600", tok.TokenType, tok.ExpiresIn)
			}
			if !b.srv.ValidAccessToken(tok.AccessToken) {
				t.Error("new access token is not valid")
			}
			if got := b.srv.CurrentRefreshToken(issued.AccessToken); got != tok.RefreshToken {
				t.Errorf("CurrentRefreshToken = %q, want %q", got, tok.RefreshToken)
			}
			if b.srv.Calls() != 1 || b.srv.Reuses() != 0 {
				t.Errorf("Calls %d Reuses %d, want 1 0", b.srv.Calls(), b.srv.Reuses())
			}
			log := b.srv.CallLog()
			c := log[0]
			if c.GrantType != "refresh_token" || c.ClientID != confID || c.RefreshToken != issued.RefreshToken ||
				c.Status != 200 || c.Error != "" || c.Reuse || c.Dropped || c.At.IsZero() {
				t.Errorf("call log %+v", c)
			}
			if c.Form.Get("refresh_token") != issued.RefreshToken {
				t.Errorf("logged form %v", c.Form)
			}
			log[0].Form.Set("refresh_token", "changed")
			if b.srv.CallLog()[0].Form.Get("refresh_token") != issued.RefreshToken {
				t.Error("CallLog shares its forms with the caller")
			}
		})
	}
}

func TestClientAuthentication(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name       string
		id, secret string
		style      oauth2.AuthStyle
		status     int
		code       string
	}{
		{"basic", confID, confSecret, oauth2.AuthStyleInHeader, 200, ""},
		{"post", confID, confSecret, oauth2.AuthStyleInParams, 200, ""},
		{"public client sends client_id only", publicID, "", oauth2.AuthStyleInParams, 200, ""},
		{"basic with wrong secret", confID, "nope", oauth2.AuthStyleInHeader, 401, "invalid_client"},
		{"post with wrong secret", confID, "nope", oauth2.AuthStyleInParams, 401, "invalid_client"},
		{"unknown client", "stranger", "x", oauth2.AuthStyleInHeader, 401, "invalid_client"},
		{"public client sends a secret", publicID, "x", oauth2.AuthStyleInParams, 401, "invalid_client"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			owner := tc.id
			if owner == "stranger" {
				owner = confID
			}
			rt := b.srv.Issue(owner).RefreshToken
			tok, err := refresh(b.ctx, b.config(tc.id, tc.secret, tc.style), rt)
			if got := b.srv.CallLog()[0].ClientID; got != tc.id {
				t.Errorf("logged client %q, want %q", got, tc.id)
			}
			if tc.status == 200 {
				if err != nil || !b.srv.ValidAccessToken(tok.AccessToken) {
					t.Fatalf("refresh: %v", err)
				}
				return
			}
			re := wantAnswer(t, err, tc.status, tc.code)
			if basic := tc.style == oauth2.AuthStyleInHeader; basic != (re.Response.Header.Get("WWW-Authenticate") != "") {
				t.Errorf("WWW-Authenticate %q with basic=%v", re.Response.Header.Get("WWW-Authenticate"), basic)
			}
			// A call that fails authentication spends nothing.
			mustRefresh(t, b.ctx, b.config(owner, map[string]string{confID: confSecret}[owner], oauth2.AuthStyleInParams), rt)
		})
	}
}

func TestClientAuthenticationRaw(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}

	resp, body := b.post(t, http.MethodPost, form, nil)
	if resp.StatusCode != 401 || body["error"] != "invalid_client" {
		t.Errorf("no client authentication: %d %v", resp.StatusCode, body)
	}

	both := confForm("grant_type", "refresh_token", "refresh_token", rt)
	resp, body = b.post(t, http.MethodPost, both, func(r *http.Request) {
		r.SetBasicAuth(url.QueryEscape(confID), url.QueryEscape(confSecret))
	})
	if resp.StatusCode != 400 || body["error"] != "invalid_request" {
		t.Errorf("two authentication methods: %d %v", resp.StatusCode, body)
	}

	resp, body = b.post(t, http.MethodPost, form, func(r *http.Request) { r.SetBasicAuth(confID, confSecret) })
	if resp.StatusCode != 401 || body["error"] != "invalid_client" {
		t.Errorf("HTTP Basic without form-url-encoding: %d %v", resp.StatusCode, body)
	}
	mustRefresh(t, b.ctx, b.basic(), rt)
}

func TestReuseModes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		mode    ReuseMode
		status  int
		code    string
		revokes bool
	}{
		{"okta hydra cognito", ReuseInvalidGrant, 400, "invalid_grant", false},
		{"auth0", ReuseInvalidGrant403, 403, "invalid_grant", false},
		{"dex", ReuseDexInvalidRequest, 400, "invalid_request", false},
		{"node oidc-provider", ReuseRevokeFamily, 400, "invalid_grant", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.srv.SetReuse(tc.mode)
			other := b.srv.Issue(confID)
			rt := b.srv.Issue(confID).RefreshToken
			tok := mustRefresh(t, b.ctx, b.basic(), rt)

			_, err := refresh(b.ctx, b.basic(), rt)
			wantAnswer(t, err, tc.status, tc.code)
			if b.srv.Reuses() != 1 {
				t.Errorf("Reuses = %d, want 1", b.srv.Reuses())
			}
			if c := b.srv.CallLog()[1]; !c.Reuse || c.Error != tc.code || c.Status != tc.status {
				t.Errorf("call log of the reuse: %+v", c)
			}

			_, err = refresh(b.ctx, b.basic(), tok.RefreshToken)
			if tc.revokes {
				wantAnswer(t, err, 400, "invalid_grant")
				if b.srv.ValidAccessToken(tok.AccessToken) {
					t.Error("access token of a revoked family is still valid")
				}
			} else if err != nil {
				t.Errorf("newest refresh token after a reuse: %v", err)
			}
			if b.srv.Reuses() != 1 {
				t.Errorf("Reuses = %d after using the newest token, want 1", b.srv.Reuses())
			}
			// Other grants are untouched.
			if !b.srv.ValidAccessToken(other.AccessToken) {
				t.Error("another family's access token was revoked")
			}
			mustRefresh(t, b.ctx, b.basic(), other.RefreshToken)
		})
	}
}

func TestReuseInterval(t *testing.T) {
	t.Parallel()
	b := setup(t)
	clk := newClock()
	b.srv.SetClock(clk.Now)
	b.srv.SetReuseInterval(30 * time.Second)
	rt := b.srv.Issue(confID).RefreshToken
	first := mustRefresh(t, b.ctx, b.basic(), rt)

	clk.Advance(30 * time.Second)
	again := mustRefresh(t, b.ctx, b.basic(), rt)
	if again.AccessToken != first.AccessToken || again.RefreshToken != first.RefreshToken {
		t.Errorf("reuse within the interval got %q %q, want the first answer %q %q",
			again.AccessToken, again.RefreshToken, first.AccessToken, first.RefreshToken)
	}
	if c := b.srv.CallLog()[1]; b.srv.Reuses() != 1 || !c.Reuse || c.Status != 200 {
		t.Errorf("Reuses %d, call log %+v; want a counted reuse answered 200", b.srv.Reuses(), c)
	}

	clk.Advance(time.Nanosecond)
	_, err := refresh(b.ctx, b.basic(), rt)
	wantAnswer(t, err, 400, "invalid_grant")
	if b.srv.Reuses() != 2 {
		t.Errorf("Reuses = %d, want 2", b.srv.Reuses())
	}
	next := mustRefresh(t, b.ctx, b.basic(), first.RefreshToken)

	// No grace for a revoked family.
	b.srv.Revoke(next.RefreshToken)
	_, err = refresh(b.ctx, b.basic(), first.RefreshToken)
	wantAnswer(t, err, 400, "invalid_grant")
}

func TestRevoke(t *testing.T) {
	t.Parallel()
	b := setup(t)
	issued := b.srv.Issue(confID)
	tok := mustRefresh(t, b.ctx, b.basic(), issued.RefreshToken)

	b.srv.Revoke(issued.RefreshToken) // any token of the family revokes all of it
	_, err := refresh(b.ctx, b.basic(), tok.RefreshToken)
	if re := wantAnswer(t, err, 400, "invalid_grant"); re.ErrorDescription != "token revoked" {
		t.Errorf("error_description %q, want %q", re.ErrorDescription, "token revoked")
	}
	if b.srv.ValidAccessToken(tok.AccessToken) || b.srv.ValidAccessToken(issued.AccessToken) {
		t.Error("access tokens of a revoked family are still valid")
	}
	if b.srv.Reuses() != 0 {
		t.Errorf("Reuses = %d, want 0", b.srv.Reuses())
	}
}

func TestRotationOff(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.srv.SetRotation(false)
	rt := b.srv.Issue(confID).RefreshToken

	resp, body := b.post(t, http.MethodPost, confForm("grant_type", "refresh_token", "refresh_token", rt), nil)
	if _, has := body["refresh_token"]; resp.StatusCode != 200 || has || body["access_token"] == "" {
		t.Fatalf("answer %d %v, want 200 with an access token and no refresh_token", resp.StatusCode, body)
	}
	// x/oauth2 carries the old refresh token forward (RFC 6749 §6).
	tok := mustRefresh(t, b.ctx, b.basic(), rt)
	tok2 := mustRefresh(t, b.ctx, b.basic(), rt)
	if tok.RefreshToken != rt || tok.AccessToken == tok2.AccessToken {
		t.Errorf("got %+v then %+v", tok, tok2)
	}
	if b.srv.Reuses() != 0 || b.srv.Calls() != 3 || b.srv.CurrentRefreshToken(rt) != rt {
		t.Errorf("Reuses %d Calls %d Current %q", b.srv.Reuses(), b.srv.Calls(), b.srv.CurrentRefreshToken(rt))
	}
	if !b.srv.ValidAccessToken(tok.AccessToken) || !b.srv.ValidAccessToken(tok2.AccessToken) {
		t.Error("access tokens are not valid")
	}
}

func TestAnswerShape(t *testing.T) {
	t.Parallel()
	b := setup(t)
	clk := newClock()
	b.srv.SetClock(clk.Now)
	b.srv.SetExpiresIn(0)
	b.srv.SetTokenType("bearer")
	issued := b.srv.Issue(confID)
	if issued.ExpiresIn != 0 || issued.TokenType != "bearer" {
		t.Errorf("Issue = %+v", issued)
	}

	resp, body := b.post(t, http.MethodPost, confForm("grant_type", "refresh_token", "refresh_token", issued.RefreshToken, "scope", "read write"), nil)
	if resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("headers %v", resp.Header)
	}
	if _, has := body["expires_in"]; has || body["token_type"] != "bearer" || body["scope"] != "read write" {
		t.Errorf("answer %v, want no expires_in, token_type bearer, scope echoed", body)
	}

	tok := mustRefresh(t, b.ctx, b.basic(), body["refresh_token"].(string))
	if !tok.Expiry.IsZero() || tok.ExpiresIn != 0 || tok.TokenType != "bearer" {
		t.Errorf("x/oauth2 token %+v", tok)
	}
	clk.Advance(10 * 365 * 24 * time.Hour)
	if !b.srv.ValidAccessToken(tok.AccessToken) {
		t.Error("an access token issued without expires_in expired")
	}
}

func TestAccessTokenExpiry(t *testing.T) {
	t.Parallel()
	b := setup(t)
	clk := newClock()
	b.srv.SetClock(clk.Now)
	b.srv.SetExpiresIn(60)
	at := b.srv.Issue(confID).AccessToken

	clk.Advance(59 * time.Second)
	if !b.srv.ValidAccessToken(at) {
		t.Error("access token expired early")
	}
	clk.Advance(time.Second)
	if b.srv.ValidAccessToken(at) {
		t.Error("access token valid after expires_in")
	}
	if b.srv.ValidAccessToken("at-unknown") {
		t.Error("unknown access token is valid")
	}
}

func TestAnotherClientsToken(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.srv.AddClient("other", "pw")
	rt := b.srv.Issue(confID).RefreshToken

	_, err := refresh(b.ctx, b.config("other", "pw", oauth2.AuthStyleInHeader), rt)
	wantAnswer(t, err, 400, "invalid_grant")
	mustRefresh(t, b.ctx, b.basic(), rt) // not spent by the other client
	if b.srv.Reuses() != 0 {
		t.Errorf("Reuses = %d, want 0", b.srv.Reuses())
	}
}

func TestClientCredentials(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cc := &clientcredentials.Config{
		ClientID:       confID,
		ClientSecret:   confSecret,
		TokenURL:       b.srv.TokenURL(),
		AuthStyle:      oauth2.AuthStyleInParams,
		Scopes:         []string{"read"},
		EndpointParams: url.Values{"resource": {"https://mcp.example/"}},
	}
	tok, err := cc.Token(b.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if tok.RefreshToken != "" || tok.Extra("scope") != "read" || !b.srv.ValidAccessToken(tok.AccessToken) {
		t.Errorf("token %+v scope %v", tok, tok.Extra("scope"))
	}
	if b.srv.CurrentRefreshToken(tok.AccessToken) != "" {
		t.Error("a client_credentials token has a refresh token")
	}
	if c := b.srv.CallLog()[0]; c.GrantType != "client_credentials" || c.Form.Get("resource") != "https://mcp.example/" {
		t.Errorf("call log %+v", c)
	}

	cc.ClientID, cc.ClientSecret = publicID, ""
	_, err = cc.Token(b.ctx)
	wantAnswer(t, err, 400, "unauthorized_client")
}

func TestBadRequests(t *testing.T) {
	t.Parallel()
	b := setup(t)

	resp, body := b.post(t, http.MethodGet, nil, nil)
	if resp.StatusCode != 405 || resp.Header.Get("Allow") != "POST" {
		t.Errorf("GET: %d %v %v", resp.StatusCode, resp.Header, body)
	}
	resp, body = b.post(t, http.MethodPost, confForm(), nil)
	if resp.StatusCode != 400 || body["error"] != "invalid_request" {
		t.Errorf("no grant_type: %d %v", resp.StatusCode, body)
	}
	resp, body = b.post(t, http.MethodPost, confForm("grant_type", "refresh_token"), nil)
	if resp.StatusCode != 400 || body["error"] != "invalid_request" {
		t.Errorf("no refresh_token: %d %v", resp.StatusCode, body)
	}
	_, err := b.basic().PasswordCredentialsToken(b.ctx, "user", "pass")
	wantAnswer(t, err, 400, "unsupported_grant_type")
	_, err = refresh(b.ctx, b.basic(), "rt-unknown")
	wantAnswer(t, err, 400, "invalid_grant")

	var got []int
	for _, c := range b.srv.CallLog() {
		got = append(got, c.Status)
	}
	if b.srv.Calls() != 5 || len(got) != 5 || got[0] != 405 || got[4] != 400 {
		t.Errorf("Calls %d, statuses %v", b.srv.Calls(), got)
	}
}

func TestFailQueue(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	b.srv.Fail(2, 503, "", nil)
	b.srv.Fail(1, 429, `{"error":"rate_limited"}`, http.Header{"Retry-After": {"2"}})

	for range 2 {
		_, err := refresh(b.ctx, b.basic(), rt)
		wantAnswer(t, err, 503, "")
	}
	_, err := refresh(b.ctx, b.basic(), rt)
	if re := wantAnswer(t, err, 429, "rate_limited"); re.Response.Header.Get("Retry-After") != "2" {
		t.Errorf("Retry-After %q, want 2", re.Response.Header.Get("Retry-After"))
	}
	mustRefresh(t, b.ctx, b.basic(), rt) // failed calls spend nothing

	var got []string
	for _, c := range b.srv.CallLog() {
		got = append(got, http.StatusText(c.Status)+"/"+c.Error)
	}
	want := "Service Unavailable/ Service Unavailable/ Too Many Requests/rate_limited OK/"
	if strings.Join(got, " ") != want || b.srv.Calls() != 4 || b.srv.Reuses() != 0 {
		t.Errorf("call log %v, Calls %d, Reuses %d", got, b.srv.Calls(), b.srv.Reuses())
	}
}

func TestDown(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	// A first answer leaves a kept-alive connection: the failure must also
	// show on a reused connection, and the client must not retry the POST.
	_, err := b.basic().PasswordCredentialsToken(b.ctx, "u", "p")
	wantAnswer(t, err, 400, "unsupported_grant_type")

	b.srv.SetDown(true)
	for i := range 2 {
		_, err = refresh(b.ctx, b.basic(), rt)
		wantTransportError(t, err)
		if b.srv.Calls() != 2+i {
			t.Fatalf("Calls = %d, want %d", b.srv.Calls(), 2+i)
		}
	}
	if c := b.srv.CallLog()[1]; !c.Dropped || c.Status != 0 {
		t.Errorf("call log %+v", c)
	}

	b.srv.SetDown(false)
	mustRefresh(t, b.ctx, b.basic(), rt) // a dropped call spends nothing
}

func TestDropAnswers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	b.srv.DropAnswers(1)

	_, err := refresh(b.ctx, b.basic(), rt)
	wantTransportError(t, err)
	if c := b.srv.CallLog()[0]; !c.Dropped || c.Status != 200 {
		t.Errorf("call log %+v", c)
	}
	// The lost answer spent the refresh token: a retry is a reuse.
	_, err = refresh(b.ctx, b.basic(), rt)
	wantAnswer(t, err, 400, "invalid_grant")
	if b.srv.Reuses() != 1 {
		t.Errorf("Reuses = %d, want 1", b.srv.Reuses())
	}
	mustRefresh(t, b.ctx, b.basic(), b.srv.CurrentRefreshToken(rt))
}

func TestLatency(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken

	b.srv.SetLatency(100 * time.Millisecond)
	start := time.Now()
	tok := mustRefresh(t, b.ctx, b.basic(), rt)
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("answered after %v, want at least 100ms", d)
	}

	b.srv.SetLatency(time.Hour)
	ctx, cancel := context.WithTimeout(b.ctx, 50*time.Millisecond)
	defer cancel()
	_, err := refresh(ctx, b.basic(), tok.RefreshToken)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	// The server stops waiting when the client goes away.
	wait, cancelWait := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancelWait()
	if err := b.srv.WaitCalls(wait, 2); err != nil {
		t.Fatalf("the abandoned call is still waiting: %v", err)
	}
	if c := b.srv.CallLog()[1]; !c.Dropped || c.Status != 0 {
		t.Errorf("call log %+v", c)
	}

	b.srv.SetLatency(0)
	mustRefresh(t, b.ctx, b.basic(), tok.RefreshToken) // the abandoned call spent nothing
	if b.srv.Reuses() != 0 {
		t.Errorf("Reuses = %d, want 0", b.srv.Reuses())
	}
}

func TestOnToken(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rt := b.srv.Issue(confID).RefreshToken
	entered := make(chan string, 1)
	release := make(chan struct{})
	b.srv.OnToken(func(r *http.Request) {
		entered <- r.PostForm.Get("refresh_token")
		<-release
	})

	done := make(chan error, 1)
	go func() {
		_, err := refresh(b.ctx, b.basic(), rt)
		done <- err
	}()
	if got := <-entered; got != rt {
		t.Errorf("hook saw refresh_token %q, want %q", got, rt)
	}
	if c := b.srv.CallLog(); b.srv.Calls() != 1 || c[0].Status != 0 {
		t.Errorf("mid-call: Calls %d, log %+v", b.srv.Calls(), c)
	}
	b.srv.Revoke(rt) // state changed while the call is in flight
	close(release)
	if re := wantAnswer(t, <-done, 400, "invalid_grant"); re.ErrorDescription != "token revoked" {
		t.Errorf("error_description %q", re.ErrorDescription)
	}

	// The hook does not run for a call that fails authentication, and nil removes it.
	b.srv.OnToken(func(*http.Request) { t.Error("hook ran for an unauthenticated call") })
	_, err := refresh(b.ctx, b.config(confID, "wrong", oauth2.AuthStyleInHeader), rt)
	wantAnswer(t, err, 401, "invalid_client")
	b.srv.OnToken(nil)
	_, err = refresh(b.ctx, b.basic(), rt)
	wantAnswer(t, err, 400, "invalid_grant")
}

// TestConcurrentRedeem is the storm the refresher exists to prevent: many
// holders of one refresh token redeem it at once.
func TestConcurrentRedeem(t *testing.T) {
	t.Parallel()
	const n = 50
	cases := []struct {
		name     string
		mode     ReuseMode
		interval time.Duration
		status   int
		code     string
		wantOK   int
	}{
		{"invalid_grant", ReuseInvalidGrant, 0, 400, "invalid_grant", 1},
		{"auth0", ReuseInvalidGrant403, 0, 403, "invalid_grant", 1},
		{"dex", ReuseDexInvalidRequest, 0, 400, "invalid_request", 1},
		{"revoke family", ReuseRevokeFamily, 0, 400, "invalid_grant", 1},
		{"reuse interval", ReuseInvalidGrant, time.Hour, 0, "", n},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.srv.SetReuse(tc.mode)
			b.srv.SetReuseInterval(tc.interval)
			rt := b.srv.Issue(confID).RefreshToken
			cfg := b.basic()

			start := make(chan struct{})
			tokens := make([]*oauth2.Token, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					<-start
					tokens[i], errs[i] = refresh(b.ctx, cfg, rt)
				})
			}
			close(start)
			wg.Wait()

			var won []*oauth2.Token
			for i, err := range errs {
				if err == nil {
					won = append(won, tokens[i])
					continue
				}
				wantAnswer(t, err, tc.status, tc.code)
			}
			if len(won) != tc.wantOK {
				t.Fatalf("%d successes, want %d", len(won), tc.wantOK)
			}
			for _, tok := range won[1:] {
				if tok.AccessToken != won[0].AccessToken || tok.RefreshToken != won[0].RefreshToken {
					t.Errorf("successes got different tokens: %+v and %+v", tok, won[0])
				}
			}
			if b.srv.Calls() != n || b.srv.Reuses() != n-1 {
				t.Errorf("Calls %d Reuses %d, want %d %d", b.srv.Calls(), b.srv.Reuses(), n, n-1)
			}
			firsts := 0
			for _, c := range b.srv.CallLog() {
				if !c.Reuse {
					firsts++
					if c.Status != 200 {
						t.Errorf("the redemption answered %d", c.Status)
					}
				}
			}
			if firsts != 1 {
				t.Errorf("%d calls logged as not reuse, want 1", firsts)
			}

			_, err := refresh(b.ctx, cfg, won[0].RefreshToken)
			if tc.mode == ReuseRevokeFamily {
				wantAnswer(t, err, 400, "invalid_grant")
				if b.srv.ValidAccessToken(won[0].AccessToken) {
					t.Error("the winner's access token survived the family's revocation")
				}
			} else if err != nil {
				t.Errorf("the winner's refresh token: %v", err)
			}
		})
	}
}

// TestConcurrentUse changes settings and reads counts while calls run, for
// the race detector.
func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.srv.SetRotation(false)
	rt := b.srv.Issue(confID).RefreshToken
	const n = 20
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if _, err := refresh(b.ctx, b.basic(), rt); err != nil {
				t.Errorf("refresh: %v", err)
			}
		})
		wg.Go(func() {
			b.srv.SetTokenType("bearer")
			b.srv.SetExpiresIn(60)
			b.srv.SetReuse(ReuseDexInvalidRequest)
			b.srv.SetReuseInterval(time.Second)
			b.srv.SetLatency(time.Millisecond)
			b.srv.OnToken(func(*http.Request) {})
			b.srv.Issue(confID)
			_ = b.srv.CallLog()
			_ = b.srv.Calls() + b.srv.Reuses()
			_ = b.srv.ValidAccessToken("at-x")
			_ = b.srv.CurrentRefreshToken(rt)
		})
	}
	wg.Wait()
	if b.srv.Calls() != n {
		t.Errorf("Calls = %d, want %d", b.srv.Calls(), n)
	}
	if err := b.srv.WaitCalls(t.Context(), n); err != nil {
		t.Error(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := b.srv.WaitCalls(ctx, n+1); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitCalls on a cancelled context: %v", err)
	}
}

func TestMetadata(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, path := range []string{"/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"} {
		resp, err := b.srv.Client().Get(b.srv.BaseURL() + path)
		if err != nil {
			t.Fatal(err)
		}
		var md struct {
			Issuer        string   `json:"issuer"`
			TokenEndpoint string   `json:"token_endpoint"`
			AuthMethods   []string `json:"token_endpoint_auth_methods_supported"`
			GrantTypes    []string `json:"grant_types_supported"`
		}
		err = json.NewDecoder(resp.Body).Decode(&md)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %d %v", path, resp.StatusCode, err)
		}
		if md.Issuer != b.srv.BaseURL() || md.TokenEndpoint != b.srv.TokenURL() ||
			strings.Join(md.AuthMethods, " ") != "client_secret_basic client_secret_post" ||
			strings.Join(md.GrantTypes, " ") != "authorization_code refresh_token client_credentials urn:ietf:params:oauth:grant-type:device_code" {
			t.Errorf("%s: %+v", path, md)
		}
	}
	if b.srv.Calls() != 0 {
		t.Errorf("metadata requests counted as token calls: %d", b.srv.Calls())
	}
}

func TestTokensUnique(t *testing.T) {
	t.Parallel()
	b := setup(t)
	atRE, rtRE := regexp.MustCompile(`^at-[0-9a-f]{24}$`), regexp.MustCompile(`^rt-[0-9a-f]{24}$`)
	seen := make(map[string]bool)
	for range 1000 {
		tk := b.srv.Issue(publicID)
		if !atRE.MatchString(tk.AccessToken) || !rtRE.MatchString(tk.RefreshToken) {
			t.Fatalf("token shapes %+v", tk)
		}
		if seen[tk.AccessToken] || seen[tk.RefreshToken] {
			t.Fatalf("token issued twice: %+v", tk)
		}
		seen[tk.AccessToken], seen[tk.RefreshToken] = true, true
	}
}
