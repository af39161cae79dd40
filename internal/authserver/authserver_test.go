package authserver_test

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

	"github.com/authbus/authbus/internal/authserver"
	"github.com/authbus/authbus/internal/authtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	confID     = "agent"
	confSecret = "s3cr+t/=&:%x"
	publicID   = "cli"
	redirect   = "http://127.0.0.1:1/callback" // nothing listens: the tests read the redirect
)

type testBundle struct {
	srv *authtest.Server
	ctx context.Context // carries srv.Client() for x/oauth2
	// browser stops at redirects, so tests see where the server sends the
	// person; the redirect URI has no listener.
	browser authtest.Browser
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	srv := authtest.New(t)
	srv.AddClient(confID, confSecret)
	srv.AddClient(publicID, "")
	hc := &http.Client{
		Transport:     srv.Client().Transport,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return &testBundle{
		srv:     srv,
		ctx:     context.WithValue(t.Context(), oauth2.HTTPClient, srv.Client()),
		browser: authtest.Browser{Client: hc},
	}
}

func (b *testBundle) config(id, secret string) *oauth2.Config {
	style := oauth2.AuthStyleInHeader
	if secret == "" {
		style = oauth2.AuthStyleInParams
	}
	return &oauth2.Config{
		ClientID:     id,
		ClientSecret: secret,
		RedirectURL:  redirect,
		Scopes:       []string{"read"},
		Endpoint: oauth2.Endpoint{
			AuthURL:       b.srv.BaseURL() + authserver.AuthorizePath,
			TokenURL:      b.srv.TokenURL(),
			DeviceAuthURL: b.srv.BaseURL() + authserver.DeviceAuthorizationPath,
			AuthStyle:     style,
		},
	}
}

// redirected returns the query of the redirect a page answered with.
func redirected(t *testing.T, p *authtest.Page) url.Values {
	t.Helper()
	if p.Status != http.StatusSeeOther {
		t.Fatalf("HTTP %d, want a 303 redirect back to the client:\n%s", p.Status, p.Body)
	}
	loc, err := url.Parse(p.Header.Get("Location"))
	if err != nil || !strings.HasPrefix(loc.String(), redirect+"?") {
		t.Fatalf("redirect to %q, want %s?…", p.Header.Get("Location"), redirect)
	}
	return loc.Query()
}

// login runs the authorization code flow up to the code, approving on the
// consent page.
func (b *testBundle) login(t *testing.T, cfg *oauth2.Config, verifier string) string {
	t.Helper()
	p, err := b.browser.Approve(b.ctx, cfg.AuthCodeURL("st4te", oauth2.S256ChallengeOption(verifier)))
	if err != nil {
		t.Fatal(err)
	}
	q := redirected(t, p)
	if q.Get("state") != "st4te" || q.Get("iss") != b.srv.BaseURL() || q.Get("code") == "" {
		t.Fatalf("redirect query %v, want code, state st4te and iss %s", q, b.srv.BaseURL())
	}
	return q.Get("code")
}

func wantAnswer(t *testing.T, err error, status int, code string) *oauth2.RetrieveError {
	t.Helper()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		t.Fatalf("got error %v, want an answer %d %q", err, status, code)
	}
	if re.Response.StatusCode != status || re.ErrorCode != code {
		t.Fatalf("got answer %d %q (%s), want %d %q", re.Response.StatusCode, re.ErrorCode, re.ErrorDescription, status, code)
	}
	return re
}

func refresh(ctx context.Context, cfg *oauth2.Config, rt string) (*oauth2.Token, error) {
	return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token()
}

func TestStartRefusesAddressesOtherMachinesReach(t *testing.T) {
	t.Parallel()
	for _, addr := range []string{":0", "0.0.0.0:0", "[::]:0", "192.0.2.1:0", "example.com:0"} {
		if s, err := authserver.Start(addr); !errors.Is(err, authserver.ErrNotLoopback) {
			if s != nil {
				s.Close()
			}
			t.Errorf("Start(%q): %v, want ErrNotLoopback", addr, err)
		}
	}
	s, err := authserver.Start("localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s.Close() // a second Close does nothing
}

// A page whose DNS name was rebound to 127.0.0.1 reaches the listener with
// its own name in Host, and gets none of the pages a person answers.
func TestRefusesOtherHostNames(t *testing.T) {
	t.Parallel()
	b := setup(t)
	req, _ := http.NewRequestWithContext(b.ctx, http.MethodGet, b.srv.BaseURL()+authserver.DevicePath, nil)
	req.Host = "attacker.example"
	resp, err := b.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("HTTP %d, want 421", resp.StatusCode)
	}
}

func TestAuthorizationCodeWithPKCE(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, id, secret string }{{"public", publicID, ""}, {"confidential", confID, confSecret}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			cfg := b.config(tc.id, tc.secret)
			verifier := oauth2.GenerateVerifier()
			code := b.login(t, cfg, verifier)

			tok, err := cfg.Exchange(b.ctx, code, oauth2.VerifierOption(verifier))
			if err != nil {
				t.Fatal(err)
			}
			if !b.srv.ValidAccessToken(tok.AccessToken) || tok.RefreshToken == "" || tok.Extra("scope") != "read" {
				t.Fatalf("token %+v scope %v", tok, tok.Extra("scope"))
			}
			c := b.srv.CallLog()[0]
			if c.GrantType != "authorization_code" || c.ClientID != tc.id || c.Status != 200 {
				t.Errorf("call log %+v", c)
			}
			next, err := refresh(b.ctx, cfg, tok.RefreshToken)
			if err != nil || next.RefreshToken == tok.RefreshToken {
				t.Fatalf("refresh of the login's token: %+v, %v", next, err)
			}

			// A code presented twice may have been stolen: the grant ends.
			_, err = cfg.Exchange(b.ctx, code, oauth2.VerifierOption(verifier))
			wantAnswer(t, err, 400, "invalid_grant")
			if b.srv.ValidAccessToken(next.AccessToken) {
				t.Error("the grant of a code used twice is still valid")
			}
			_, err = refresh(b.ctx, cfg, next.RefreshToken)
			wantAnswer(t, err, 400, "invalid_grant")
		})
	}
}

func TestAuthorizationCodeRefusals(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		spoil  func(b *testBundle, form url.Values, clk *clock)
		status int
		code   string
	}{
		{"wrong verifier", func(_ *testBundle, f url.Values, _ *clock) { f.Set("code_verifier", oauth2.GenerateVerifier()) }, 400, "invalid_grant"},
		{"no verifier", func(_ *testBundle, f url.Values, _ *clock) { f.Del("code_verifier") }, 400, "invalid_grant"},
		{"other redirect_uri", func(_ *testBundle, f url.Values, _ *clock) { f.Set("redirect_uri", "http://127.0.0.1:2/callback") }, 400, "invalid_grant"},
		{"another client", func(_ *testBundle, f url.Values, _ *clock) { f.Set("client_id", "other") }, 400, "invalid_grant"},
		{"expired", func(_ *testBundle, _ url.Values, c *clock) { c.Advance(time.Minute) }, 400, "invalid_grant"},
		{"no code", func(_ *testBundle, f url.Values, _ *clock) { f.Del("code") }, 400, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.srv.AddClient("other", "")
			clk := newClock()
			b.srv.SetClock(clk.Now)
			cfg := b.config(publicID, "")
			verifier := oauth2.GenerateVerifier()
			code := b.login(t, cfg, verifier)
			good := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "client_id": {publicID},
				"redirect_uri": {redirect}, "code_verifier": {verifier}}
			bad := authserverClone(good)
			tc.spoil(b, bad, clk)

			resp, body := b.post(t, authserver.TokenPath, bad)
			if resp.StatusCode != tc.status || body["error"] != tc.code {
				t.Errorf("HTTP %d %v, want %d %s", resp.StatusCode, body, tc.status, tc.code)
			}
			if tc.name == "expired" {
				return
			}
			// A refused redemption does not spend the code.
			if resp, body := b.post(t, authserver.TokenPath, good); resp.StatusCode != 200 {
				t.Errorf("the code after a refused redemption: HTTP %d %v", resp.StatusCode, body)
			}
		})
	}
}

func authserverClone(v url.Values) url.Values {
	c := url.Values{}
	for k, vv := range v {
		c[k] = append([]string(nil), vv...)
	}
	return c
}

// post sends a form to a path of the server and decodes the JSON answer.
func (b *testBundle) post(t *testing.T, path string, form url.Values) (*http.Response, map[string]any) {
	t.Helper()
	resp, err := b.srv.Client().PostForm(b.srv.BaseURL()+path, form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp, body
}

func TestAuthorizationRequestErrors(t *testing.T) {
	t.Parallel()
	b := setup(t)
	base := b.srv.BaseURL() + authserver.AuthorizePath + "?"
	challenge := oauth2.S256ChallengeFromVerifier(oauth2.GenerateVerifier())
	good := url.Values{"response_type": {"code"}, "client_id": {publicID}, "redirect_uri": {redirect},
		"state": {"s"}, "code_challenge": {challenge}, "code_challenge_method": {"S256"}}
	with := func(kv ...string) string {
		q := authserverClone(good)
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == "" {
				q.Del(kv[i])
			} else {
				q.Set(kv[i], kv[i+1])
			}
		}
		return base + q.Encode()
	}

	// Errors the client can be trusted with go back to it, with the state.
	for _, tc := range []struct{ url, code string }{
		{with("code_challenge", ""), "invalid_request"},
		{with("code_challenge_method", "plain"), "invalid_request"},
		{with("code_challenge_method", ""), "invalid_request"},
		{with("code_challenge", "short"), "invalid_request"},
		{with("response_type", "token"), "unsupported_response_type"},
	} {
		p, err := b.browser.Open(b.ctx, tc.url)
		if err != nil {
			t.Fatal(err)
		}
		if q := redirected(t, p); q.Get("error") != tc.code || q.Get("state") != "s" || q.Get("code") != "" {
			t.Errorf("%s: redirect query %v, want error %s", tc.url, q, tc.code)
		}
	}
	// An unknown client or a redirect URI off this machine gets a page,
	// never a redirect.
	for _, u := range []string{
		with("client_id", "stranger"), with("redirect_uri", "https://attacker.example/cb"),
		with("redirect_uri", "http://192.0.2.1/cb"), with("redirect_uri", ""),
	} {
		p, err := b.browser.Open(b.ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		if p.Status != http.StatusBadRequest || p.Header.Get("Location") != "" {
			t.Errorf("%s: HTTP %d Location %q, want 400 and no redirect", u, p.Status, p.Header.Get("Location"))
		}
	}

	// Deny; then the answered page cannot be answered again.
	page, err := b.browser.Open(b.ctx, with())
	if err != nil {
		t.Fatal(err)
	}
	if page.Header.Get("X-Frame-Options") != "DENY" || page.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("consent page headers %v", page.Header)
	}
	p, err := b.browser.Submit(b.ctx, page, nil, "deny")
	if err != nil {
		t.Fatal(err)
	}
	if q := redirected(t, p); q.Get("error") != "access_denied" || q.Get("state") != "s" {
		t.Errorf("deny: redirect query %v", q)
	}
	p, err = b.browser.Submit(b.ctx, page, nil, "approve")
	if err != nil {
		t.Fatal(err)
	}
	if p.Status != http.StatusBadRequest {
		t.Errorf("a consent page answered twice: HTTP %d", p.Status)
	}
	if b.srv.Calls() != 0 {
		t.Errorf("authorization requests counted as token calls: %d", b.srv.Calls())
	}
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

func TestDeviceFlow(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.srv.SetDeviceInterval(time.Second)
	cfg := b.config(publicID, "")
	da, err := cfg.DeviceAuth(b.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[B-Z]{4}-[B-Z]{4}$`).MatchString(da.UserCode) || da.Interval != 1 ||
		da.VerificationURI != b.srv.BaseURL()+authserver.DevicePath || !strings.Contains(da.VerificationURIComplete, "user_code=") {
		t.Fatalf("device authorization %+v", da)
	}
	// Approved before the first poll: x/oauth2's first poll gets the token.
	if p, err := b.browser.ApproveDevice(b.ctx, da.VerificationURI, strings.ToLower(da.UserCode)); err != nil || p.Status != 200 {
		t.Fatalf("approve: %v", err)
	}
	tok, err := cfg.DeviceAccessToken(b.ctx, da)
	if err != nil {
		t.Fatal(err)
	}
	if !b.srv.ValidAccessToken(tok.AccessToken) || tok.RefreshToken == "" {
		t.Fatalf("token %+v", tok)
	}
	if c := b.srv.CallLog()[0]; c.GrantType != authserver.DeviceCodeGrant || c.Status != 200 {
		t.Errorf("call log %+v", c)
	}
	// A device code is redeemed once.
	resp, body := b.post(t, authserver.TokenPath, url.Values{"grant_type": {authserver.DeviceCodeGrant}, "device_code": {da.DeviceCode}, "client_id": {publicID}})
	if resp.StatusCode != 400 || body["error"] != "invalid_grant" {
		t.Errorf("second redemption: HTTP %d %v", resp.StatusCode, body)
	}
}

func TestDevicePolling(t *testing.T) {
	t.Parallel()
	b := setup(t)
	clk := newClock()
	b.srv.SetClock(clk.Now)
	start := func() (deviceCode, userCode string) {
		resp, body := b.post(t, authserver.DeviceAuthorizationPath, url.Values{"client_id": {publicID}, "scope": {"read"}})
		if resp.StatusCode != 200 || body["interval"] != 5.0 || body["expires_in"] != 600.0 {
			t.Fatalf("device authorization: HTTP %d %v", resp.StatusCode, body)
		}
		return body["device_code"].(string), body["user_code"].(string)
	}
	poll := func(dc string) string {
		t.Helper()
		resp, body := b.post(t, authserver.TokenPath, url.Values{"grant_type": {authserver.DeviceCodeGrant}, "device_code": {dc}, "client_id": {publicID}})
		if resp.StatusCode == 200 {
			return "token"
		}
		return body["error"].(string)
	}

	dc, uc := start()
	steps := []struct {
		advance time.Duration
		want    string
	}{
		{0, "authorization_pending"},
		{time.Second, "slow_down"},                  // 1 s after a poll with a 5 s interval; the interval becomes 10 s
		{5 * time.Second, "slow_down"},              // 5 s is too early now; 15 s
		{15 * time.Second, "authorization_pending"}, // on time
		{12 * time.Second, "authorization_pending"}, // a little early: jitter is forgiven
	}
	for i, s := range steps {
		clk.Advance(s.advance)
		if got := poll(dc); got != s.want {
			t.Fatalf("poll %d: %s, want %s", i, got, s.want)
		}
	}
	p, err := b.browser.Open(b.ctx, b.srv.BaseURL()+authserver.DevicePath+"?user_code="+url.QueryEscape(uc))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.browser.Submit(b.ctx, p, nil, "deny"); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Minute)
	if got := poll(dc); got != "access_denied" {
		t.Errorf("after deny: %s", got)
	}

	dc, uc = start()
	clk.Advance(10 * time.Minute)
	if got := poll(dc); got != "expired_token" {
		t.Errorf("after 10 minutes: %s", got)
	}
	if p, err := b.browser.Open(b.ctx, b.srv.BaseURL()+authserver.DevicePath+"?user_code="+url.QueryEscape(uc)); err != nil || p.Status != 400 {
		t.Errorf("verification page of an expired code: %v", err)
	}
	if got := poll("dc-unknown"); got != "invalid_grant" {
		t.Errorf("unknown device code: %s", got)
	}
	resp, body := b.post(t, authserver.DeviceAuthorizationPath, url.Values{"client_id": {"stranger"}})
	if resp.StatusCode != 401 || body["error"] != "invalid_client" {
		t.Errorf("unknown client: HTTP %d %v", resp.StatusCode, body)
	}
	resp, body = b.post(t, authserver.DeviceAuthorizationPath, url.Values{"client_id": {confID}, "client_secret": {"wrong"}})
	if resp.StatusCode != 401 || body["error"] != "invalid_client" {
		t.Errorf("wrong secret: HTTP %d %v", resp.StatusCode, body)
	}
}

// revoke calls the revocation endpoint as x/oauth2 would authenticate at
// the token endpoint: HTTP Basic for the confidential client.
func (b *testBundle) revoke(t *testing.T, id, secret, token, hint string) (int, string) {
	t.Helper()
	form := url.Values{"token": {token}, "token_type_hint": {hint}}
	req, _ := http.NewRequestWithContext(b.ctx, http.MethodPost, b.srv.BaseURL()+authserver.RevocationPath, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	resp, err := b.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Error string `json:"error"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body.Error
}

func TestRevocation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := b.config(confID, confSecret)
	b.srv.AddClient("other", "pw")

	// An access token alone: the grant goes on.
	a := b.srv.Issue(confID)
	if st, e := b.revoke(t, confID, confSecret, a.AccessToken, "access_token"); st != 200 || e != "" {
		t.Fatalf("revoke access token: %d %s", st, e)
	}
	if b.srv.ValidAccessToken(a.AccessToken) {
		t.Error("revoked access token is valid")
	}
	next, err := refresh(b.ctx, cfg, a.RefreshToken)
	if err != nil || !b.srv.ValidAccessToken(next.AccessToken) {
		t.Fatalf("the grant after revoking an access token: %v", err)
	}

	// A refresh token: the whole grant.
	if st, e := b.revoke(t, confID, confSecret, next.RefreshToken, "refresh_token"); st != 200 || e != "" {
		t.Fatalf("revoke refresh token: %d %s", st, e)
	}
	_, err = refresh(b.ctx, cfg, next.RefreshToken)
	wantAnswer(t, err, 400, "invalid_grant")
	if b.srv.ValidAccessToken(next.AccessToken) {
		t.Error("an access token of a revoked grant is valid")
	}

	// Another client's token is refused and stays valid; unknown tokens
	// and repeats are fine; a client must authenticate.
	c := b.srv.Issue(confID)
	if st, e := b.revoke(t, "other", "pw", c.RefreshToken, ""); st != 400 || e != "unauthorized_client" {
		t.Errorf("another client's token: %d %s", st, e)
	}
	if st, e := b.revoke(t, confID, "wrong", c.RefreshToken, ""); st != 401 || e != "invalid_client" {
		t.Errorf("wrong secret: %d %s", st, e)
	}
	if _, err := refresh(b.ctx, cfg, c.RefreshToken); err != nil {
		t.Errorf("a token whose revocation was refused: %v", err)
	}
	for _, tok := range []string{"rt-unknown", next.RefreshToken} {
		if st, e := b.revoke(t, confID, confSecret, tok, "refresh_token"); st != 200 || e != "" {
			t.Errorf("revoke %s: %d %s, want 200", tok, st, e)
		}
	}
	if st, _ := b.revoke(t, confID, confSecret, "", ""); st != 400 {
		t.Errorf("no token: %d", st)
	}

	log := b.srv.Revocations()
	if len(log) != 7 || log[0].TypeHint != "access_token" || log[0].ClientID != confID || log[2].Error != "unauthorized_client" || log[0].At.IsZero() {
		t.Errorf("revocation log %+v", log)
	}
	if b.srv.Calls() != 3 { // the three refreshes
		t.Errorf("revocations counted as token calls: %d", b.srv.Calls())
	}
}

func TestRevocationOff(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.srv.SetRevocation(false)
	tok := b.srv.Issue(confID)
	if st, _ := b.revoke(t, confID, confSecret, tok.RefreshToken, ""); st != 404 {
		t.Errorf("revocation endpoint off: HTTP %d, want 404", st)
	}
	if md := metadata(t, b); md["revocation_endpoint"] != nil {
		t.Errorf("metadata names a revocation endpoint that is off: %v", md["revocation_endpoint"])
	}
	if !b.srv.ValidAccessToken(tok.AccessToken) {
		t.Error("a token was revoked by an endpoint that is off")
	}
}

func metadata(t *testing.T, b *testBundle) map[string]any {
	t.Helper()
	resp, err := b.srv.Client().Get(b.srv.BaseURL() + authserver.MetadataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var md map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&md); err != nil {
		t.Fatal(err)
	}
	return md
}

func TestMetadataNamesEveryEndpoint(t *testing.T) {
	t.Parallel()
	b := setup(t)
	md := metadata(t, b)
	base := b.srv.BaseURL()
	for field, want := range map[string]string{
		"issuer": base, "authorization_endpoint": base + "/authorize", "token_endpoint": base + "/token",
		"device_authorization_endpoint": base + "/device_authorization", "revocation_endpoint": base + "/revoke",
	} {
		if md[field] != want {
			t.Errorf("%s = %v, want %s", field, md[field], want)
		}
	}
	if m, _ := md["code_challenge_methods_supported"].([]any); len(m) != 1 || m[0] != "S256" {
		t.Errorf("code_challenge_methods_supported = %v, want [S256]", md["code_challenge_methods_supported"])
	}
	// The pages the metadata leads a person to are served.
	for _, path := range []string{"/", authserver.DevicePath} {
		p, err := b.browser.Open(b.ctx, base+path)
		if err != nil || p.Status != 200 || !strings.Contains(p.Header.Get("Content-Type"), "text/html") {
			t.Errorf("%s: %v", path, err)
		}
	}
}

func TestParseReuseMode(t *testing.T) {
	t.Parallel()
	for _, m := range []authserver.ReuseMode{authserver.ReuseInvalidGrant, authserver.ReuseInvalidGrant403, authserver.ReuseDexInvalidRequest, authserver.ReuseRevokeFamily} {
		got, err := authserver.ParseReuseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseReuseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	if _, err := authserver.ParseReuseMode("lenient"); err == nil || !strings.Contains(err.Error(), "revoke_family") {
		t.Errorf("unknown mode: %v", err)
	}
}
