package workers_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// clientCredentials registers a machine credential: no refresh token, the
// next access token comes from the client_credentials grant.
func clientCredentials(r *events.RegisterRequest) {
	r.Grant = events.GrantClientCredentials
	r.Token.RefreshToken = ""
}

// A storm of 401s from 50 publishers for a client_credentials token, across
// three pools, costs one token-endpoint call per generation, and every
// subscriber gets the new token.
func TestClientCredentialsStormMakesOneCallPerGeneration(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 3, nil)
	key := fleet.MustKey(t, "acme.batch.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, clientCredentials)

	const subscribers = 3
	var ws []*fleet.Watcher
	for range subscribers {
		ws = append(ws, b.Watch(t, key))
	}
	storm := func(fp string, gen int) {
		var wg sync.WaitGroup
		for i := range 50 {
			// Half the runtimes set no Nats-Msg-Id, so the stream's
			// de-duplication alone cannot absorb the storm: the lease and
			// the stale check must.
			wg.Go(func() { b.Publish401(t, key, fp, fmt.Sprintf("gen%d-runtime-%d", gen, i), i%2 == 0) })
		}
		wg.Wait()
	}

	fp := events.Fingerprint(tok.AccessToken)
	for gen, want := range []int64{2, 3} {
		storm(fp, gen)
		var got string
		for i, w := range ws {
			ev := w.WaitFor(t, fmt.Sprintf("auth.rotated version %d", want), fleet.RotatedVersion(want))
			if i == 0 {
				got = ev.Rotated.AccessToken
			} else if ev.Rotated.AccessToken != got {
				t.Errorf("version %d: subscribers got different tokens", want)
			}
		}
		b.Settled(t)
		if calls := b.AS.Calls(); calls != int(want-1) {
			t.Fatalf("after generation %d: token-endpoint calls = %d, want %d", want, calls, want-1)
		}
		c := b.Cred(t, key)
		if c.Version != want || c.AccessToken.Reveal() != got || got == tok.AccessToken || !b.AS.ValidAccessToken(got) {
			t.Errorf("version %d: stored v%d does not hold the announced, valid, new token", want, c.Version)
		}
		// Stale 401s are answered by re-announcing the current token, so a
		// subscriber may see version want more than once: always the same.
		for i, w := range ws {
			for _, ev := range w.Events() {
				if ev.Rotated != nil && ev.Rotated.Version == want && ev.Rotated.AccessToken != got {
					t.Errorf("subscriber %d: two different tokens announced as version %d", i, want)
				}
			}
		}
		fp = events.Fingerprint(got)
	}
	for i, call := range b.AS.CallLog() {
		if call.GrantType != "client_credentials" || call.RefreshToken != "" || call.Status != 200 {
			t.Errorf("call %d: grant %q, refresh token sent %v, status %d; want a successful client_credentials call",
				i, call.GrantType, call.RefreshToken != "", call.Status)
		}
	}
	if c := b.Cred(t, key); !c.RefreshToken.IsZero() {
		t.Error("a client_credentials credential gained a refresh token")
	}
}

// A registered RFC 8707 resource and scopes go to the token endpoint on
// every refresh, whatever the grant.
func TestResourceAndScopesSentOnRefresh(t *testing.T) {
	const resource = "https://mcp.example.com/mcp"
	scopes := []string{"repo", "read:user"}
	for _, tc := range []struct {
		name  string
		grant func(*events.RegisterRequest)
	}{
		{"refresh_token", func(*events.RegisterRequest) {}},
		{"client_credentials", clientCredentials},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := fleet.Setup(t)
			b.StartPools(t, 1, nil)
			key := fleet.MustKey(t, "acme.res.github")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, func(r *events.RegisterRequest) {
				tc.grant(r)
				r.Resource, r.Scopes = resource, scopes
			})
			w := b.Watch(t, key)
			b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
			w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))

			log := b.AS.CallLog()
			if len(log) != 1 {
				t.Fatalf("token-endpoint calls = %d, want 1", len(log))
			}
			form := log[0].Form
			if got := form["resource"]; len(got) != 1 || got[0] != resource {
				t.Errorf("resource sent = %q, want exactly [%q]", got, resource)
			}
			if got := form.Get("scope"); got != strings.Join(scopes, " ") {
				t.Errorf("scope sent = %q, want %q", got, strings.Join(scopes, " "))
			}
		})
	}
}

// Without a registered resource or scopes, none are sent: an empty
// resource parameter is an invalid_target at strict servers.
func TestNoResourceOrScopeSentWhenNotRegistered(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.plain.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
	w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
	form := b.AS.CallLog()[0].Form
	if form.Has("resource") || form.Has("scope") {
		t.Errorf("resource %q scope %q sent, registered without either", form["resource"], form["scope"])
	}
}
