package authtest

import (
	"net/http"
	"net/url"
	"testing"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

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
