package authtest

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

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
