package authtest

import (
	"net/http"
	"regexp"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

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
