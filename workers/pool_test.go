package workers_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/nats-io/nats.go/jetstream"
)

// Done-when 1: a storm of 401s for one token across three pools costs one
// token-endpoint call, and every subscriber learns the new token once.
func TestStormOfOneCredentialAcrossPoolsMakesOneCall(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 3, nil)
	key := fleet.MustKey(t, "acme.alice.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)

	const subscribers = 5
	var ws []*fleet.Watcher
	for range subscribers {
		ws = append(ws, b.Watch(t, key))
	}
	fp := events.Fingerprint(tok.AccessToken)
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() { b.Publish401(t, key, fp, fmt.Sprintf("runtime-%d", i), true) })
	}
	wg.Wait()

	for _, w := range ws {
		w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
	want := b.Cred(t, key)
	for i, w := range ws {
		if n := w.Count(fleet.RotatedVersion(2)); n != 1 {
			t.Errorf("subscriber %d got %d auth.rotated version 2, want 1", i, n)
		}
		ev := w.WaitFor(t, "v2", fleet.RotatedVersion(2))
		if ev.Rotated.AccessToken != want.AccessToken.Reveal() || ev.Rotated.AccessToken == tok.AccessToken {
			t.Errorf("subscriber %d: rotated token is not the newly stored one", i)
		}
		if !b.AS.ValidAccessToken(ev.Rotated.AccessToken) {
			t.Errorf("subscriber %d: announced token is not valid at the authorization server", i)
		}
	}
}

// Done-when 2: many credentials, many publishers each, three pools: one call
// per credential.
func TestStormOfManyCredentialsMakesOneCallEach(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 3, nil)
	const creds, publishers = 200, 20
	keys := make([]events.Key, creds)
	fps := make([]string, creds)
	for i := range creds {
		keys[i] = fleet.MustKey(t, fmt.Sprintf("acme.user%d.github", i))
		tok := b.AS.Issue(fleet.ClientID)
		b.Register(t, keys[i], tok, nil)
		fps[i] = events.Fingerprint(tok.AccessToken)
	}
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			for i := range creds {
				b.Publish401(t, keys[i], fps[i], fmt.Sprintf("runtime-%d", p), true)
			}
		})
	}
	wg.Wait()
	fleet.Eventually(t, 60*time.Second, "every credential at version 2", func() bool {
		for _, k := range keys {
			if c, _, err := b.Store.Get(context.Background(), k); err != nil || c.Version != 2 {
				return false
			}
		}
		return true
	})
	b.Settled(t)
	if got := b.AS.Calls(); got != creds {
		t.Errorf("token-endpoint calls = %d, want %d", got, creds)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
}

// Done-when 3: a 401 for a token that was already replaced costs no call and
// re-announces the current token.
func TestStaleFingerprintReannouncesWithoutCall(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.bob.slack")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint("an-older-access-token"), "rt", true)
	ev := w.WaitFor(t, "re-announced version 1", fleet.RotatedVersion(1))
	if ev.Rotated.Fingerprint != events.Fingerprint(tok.AccessToken) {
		t.Errorf("re-announced fingerprint %s, want the current one", ev.Rotated.Fingerprint)
	}
	b.Settled(t)
	if got := b.AS.Calls(); got != 0 {
		t.Errorf("token-endpoint calls = %d, want 0", got)
	}
}

// Done-when 4: a refresh token the server no longer honours ends in
// needs_reauth with the server's code, whatever the server's dialect, and
// later 401s cause no call.
func TestRejectedRefreshTokenNeedsReauth(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mode   authtest.ReuseMode
		revoke bool
		reason string
	}{
		{"revoked 400 invalid_grant", authtest.ReuseInvalidGrant, true, "invalid_grant"},
		{"spent 400 invalid_grant", authtest.ReuseInvalidGrant, false, "invalid_grant"},
		{"spent 403 invalid_grant (Auth0)", authtest.ReuseInvalidGrant403, false, "invalid_grant"},
		{"spent 400 invalid_request (Dex)", authtest.ReuseDexInvalidRequest, false, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := fleet.Setup(t)
			b.AS.SetReuse(tc.mode)
			b.StartPools(t, 2, nil)
			key := fleet.MustKey(t, "acme.carol.jira")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, nil)
			if tc.revoke {
				b.AS.Revoke(tok.RefreshToken)
			} else {
				spendOutsideAuthbus(t, b, tok.RefreshToken)
			}
			callsBefore := b.AS.Calls()
			w := b.Watch(t, key)
			fp := events.Fingerprint(tok.AccessToken)
			b.Publish401(t, key, fp, "rt", true)
			ev := w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
			if ev.NeedsReauth.Reason != tc.reason || ev.NeedsReauth.Version != 1 {
				t.Errorf("needs_reauth = %+v, want reason %s version 1", ev.NeedsReauth, tc.reason)
			}
			b.Settled(t)
			if got := b.AS.Calls() - callsBefore; got != 1 {
				t.Errorf("token-endpoint calls = %d, want 1", got)
			}
			if c := b.Cred(t, key); c.State != kv.StateNeedsReauth || c.Reason != tc.reason {
				t.Errorf("stored state %s/%s, want needs_reauth/%s", c.State, c.Reason, tc.reason)
			}

			// A later 401 (outside the de-duplication window: no msg id)
			// re-announces needs_reauth and costs no call.
			b.Publish401(t, key, fp, "rt-later", false)
			fleet.Eventually(t, 10*time.Second, "second needs_reauth", func() bool {
				return w.Count(func(ev *events.Event) bool { return ev.NeedsReauth != nil }) >= 2
			})
			b.Settled(t)
			if got := b.AS.Calls() - callsBefore; got != 1 {
				t.Errorf("token-endpoint calls after a later 401 = %d, want still 1", got)
			}
		})
	}
}

// spendOutsideAuthbus redeems a refresh token as another client of the same
// grant would, so authbus's next use of it is a reuse.
func spendOutsideAuthbus(t *testing.T, b *fleet.Fleet, rt string) *oauth2.Token {
	t.Helper()
	cfg := oauth2.Config{ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
		Endpoint: oauth2.Endpoint{TokenURL: b.AS.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader}}
	tok, err := cfg.TokenSource(context.Background(), &oauth2.Token{RefreshToken: rt}).Token()
	if err != nil {
		t.Fatalf("spend refresh token outside authbus: %v", err)
	}
	return tok
}

// Done-when 5: a peer that rotated while our call was in flight wins; we
// neither declare needs_reauth nor overwrite its token.
func TestPeerRotatedWhileCallInFlight(t *testing.T) {
	t.Run("our call is answered as a reuse", func(t *testing.T) {
		b := fleet.Setup(t)
		b.StartPools(t, 1, nil)
		key := fleet.MustKey(t, "acme.dave.github")
		tok := b.AS.Issue(fleet.ClientID)
		b.Register(t, key, tok, nil)
		var once atomic.Bool
		var peer *oauth2.Token
		b.AS.OnToken(func(*http.Request) {
			if !once.CompareAndSwap(false, true) {
				return
			}
			// The peer redeems the same refresh token first and stores its result.
			peer = spendOutsideAuthbus(t, b, tok.RefreshToken)
			c, rev, err := b.Store.Get(context.Background(), key)
			if err != nil {
				t.Error(err)
				return
			}
			c.Version++
			c.AccessToken, c.RefreshToken = kv.Secret(peer.AccessToken), kv.Secret(peer.RefreshToken)
			c.Fingerprint = events.Fingerprint(peer.AccessToken)
			if _, err := b.Store.Update(context.Background(), c, rev); err != nil {
				t.Error(err)
			}
		})
		w := b.Watch(t, key)
		b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
		ev := w.WaitFor(t, "re-announce of the peer's token", fleet.RotatedVersion(2))
		b.Settled(t)
		if ev.Rotated.AccessToken != peer.AccessToken {
			t.Error("announced token is not the peer's")
		}
		if n := w.Count(func(ev *events.Event) bool { return ev.NeedsReauth != nil }); n != 0 {
			t.Errorf("got %d needs_reauth, want 0", n)
		}
		if c := b.Cred(t, key); c.State != kv.StateActive || c.Fingerprint != events.Fingerprint(peer.AccessToken) {
			t.Errorf("stored credential %s %s, want active with the peer's token", c.State, c.Fingerprint)
		}
	})
	t.Run("our late answer is discarded", func(t *testing.T) {
		b := fleet.Setup(t)
		b.StartPools(t, 1, nil)
		key := fleet.MustKey(t, "acme.erin.github")
		tok := b.AS.Issue(fleet.ClientID)
		b.Register(t, key, tok, nil)
		relogin := b.AS.Issue(fleet.ClientID)
		var once atomic.Bool
		b.AS.OnToken(func(*http.Request) {
			if once.CompareAndSwap(false, true) {
				// A person logs in again while the refresh is in flight.
				b.Register(t, key, relogin, nil)
			}
		})
		w := b.Watch(t, key)
		b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
		fleet.Eventually(t, 10*time.Second, "one token call", func() bool { return b.AS.Calls() == 1 })
		b.Settled(t)
		c := b.Cred(t, key)
		if c.Version != 2 || c.Fingerprint != events.Fingerprint(relogin.AccessToken) {
			t.Errorf("stored version %d fingerprint %s, want the re-registration (version 2)", c.Version, c.Fingerprint)
		}
		for _, ev := range w.Events() {
			if ev.Rotated != nil && ev.Rotated.Fingerprint != events.Fingerprint(relogin.AccessToken) {
				t.Errorf("published a discarded result: version %d", ev.Rotated.Version)
			}
		}
	})
}

// Done-when 6a: 503s are retried with growing delays, then the refresh succeeds.
func TestTransientErrorsBackOffThenRotate(t *testing.T) {
	b := fleet.Setup(t)
	const base = 200 * time.Millisecond
	b.StartPools(t, 1, func(c *workers.Config) { c.RetryBase = base })
	key := fleet.MustKey(t, "acme.frank.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	b.AS.Fail(3, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	w.WaitFor(t, "rotation after three 503s", fleet.RotatedVersion(2))
	calls := b.AS.CallLog()
	if len(calls) != 4 {
		t.Fatalf("calls = %d, want 4 (3×503, 1 success)", len(calls))
	}
	// Delivery n waits RetryBase·2^(n-1), jittered over [d/2, d].
	for i := 1; i < len(calls); i++ {
		gap := calls[i].At.Sub(calls[i-1].At)
		if min := (base << (i - 1)) / 2; gap < min {
			t.Errorf("gap before call %d = %v, want ≥ %v", i+1, gap, min)
		}
	}
	if b.AS.Reuses() != 0 {
		t.Errorf("reuses = %d, want 0", b.AS.Reuses())
	}
}

// Done-when 6b: a 429 with Retry-After is honoured.
func TestRetryAfterIsHonoured(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.grace.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	b.AS.Fail(1, http.StatusTooManyRequests, `{"error":"rate_limited"}`, http.Header{"Retry-After": {"2"}})
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	w.WaitFor(t, "rotation after a 429", fleet.RotatedVersion(2))
	calls := b.AS.CallLog()
	if len(calls) != 2 {
		t.Fatalf("calls = %d, want 2", len(calls))
	}
	if gap := calls[1].At.Sub(calls[0].At); gap < 2*time.Second {
		t.Errorf("second call %v after the 429, want ≥ 2s (Retry-After: 2)", gap)
	}
}

// Done-when 6c: an endpoint that is down opens the breaker; no calls are made
// until it half-opens, and nobody is sent to re-auth.
func TestBreakerStopsCallsToADownEndpoint(t *testing.T) {
	b := fleet.Setup(t)
	const openFor = 2 * time.Second
	b.StartPools(t, 1, func(c *workers.Config) { c.BreakerFailures = 3; c.BreakerOpenFor = openFor })
	key := fleet.MustKey(t, "acme.heidi.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	b.AS.SetDown(true)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	fleet.Eventually(t, 20*time.Second, "the half-open probe (4th call)", func() bool { return b.AS.Calls() >= 4 })
	b.AS.SetDown(false)
	w.WaitFor(t, "rotation once the endpoint is back", fleet.RotatedVersion(2))
	calls := b.AS.CallLog()
	if gap := calls[3].At.Sub(calls[2].At); gap < openFor {
		t.Errorf("call 4 came %v after the breaker opened, want ≥ %v", gap, openFor)
	}
	if n := w.Count(func(ev *events.Event) bool { return ev.NeedsReauth != nil }); n != 0 {
		t.Errorf("needs_reauth events = %d, want 0", n)
	}
	if len(b.Logs.Records(map[string]string{"msg": "token endpoint breaker changed state", "to": "open"})) == 0 {
		t.Error("no log record of the breaker opening")
	}
}

// Done-when 7: a token endpoint slower than the lease TTL still gets one call:
// the lease is renewed while the call is in flight.
func TestSlowEndpointKeepsLease(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 3, func(c *workers.Config) {
		c.LeaseTTL = 2 * time.Second
		c.AckWait = 2 * time.Second
		c.TokenTimeout = 10 * time.Second
	})
	key := fleet.MustKey(t, "acme.ivan.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	b.AS.SetLatency(5 * time.Second)
	w := b.Watch(t, key)
	fp := events.Fingerprint(tok.AccessToken)
	b.Publish401(t, key, fp, "rt", true)
	fleet.Eventually(t, 5*time.Second, "the slow call started", func() bool { return b.AS.Calls() == 1 })
	// More 401s for the same token while the call is in flight, outside the
	// de-duplication window: they must wait for the lease, not call.
	for i := range 5 {
		b.Publish401(t, key, fp, fmt.Sprintf("impatient-%d", i), false)
	}
	w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	b.Settled(t)
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("reuses = %d, want 0", got)
	}
}

// Done-when 8: a worker that dies mid-refresh leaves a lease that expires by
// itself, and another worker completes the refresh.
func TestDeadWorkersLeaseExpiresAndAnotherCompletes(t *testing.T) {
	b := fleet.Setup(t)
	tune := func(c *workers.Config) {
		c.LeaseTTL = 2 * time.Second
		c.AckWait = 2 * time.Second
		c.TokenTimeout = 3 * time.Second
	}
	b.StartPools(t, 1, tune)
	key := fleet.MustKey(t, "acme.judy.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)

	// The first call hangs; while it does, its worker's connection dies.
	b.AS.SetLatency(time.Hour)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	fleet.Eventually(t, 5*time.Second, "the first call started", func() bool { return b.AS.Calls() == 1 })
	if holder, held, err := b.Pools[0].Pool.Leases().Holder(context.Background(), key); err != nil || !held || holder != "pool-0" {
		t.Fatalf("lease holder = %q held=%v err=%v, want pool-0", holder, held, err)
	}
	b.Pools[0].NC.Close()
	b.AS.SetLatency(0)
	b.StartPools(t, 1, tune)

	w.WaitFor(t, "rotation by the surviving worker", fleet.RotatedVersion(2))
	b.Settled(t)
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("reuses = %d, want 0", got)
	}
	if got := b.AS.Calls(); got != 2 {
		t.Errorf("calls = %d, want 2 (the abandoned one and the completing one)", got)
	}
	if c := b.Cred(t, key); c.Version != 2 {
		t.Errorf("stored version %d, want 2", c.Version)
	}
}

// Done-when 9: malformed events are terminated with a logged reason and do
// not hold up the good ones behind them.
func TestMalformedEventsAreTerminated(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.kim.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)
	good, _ := events.Encode(key, "test", events.Unauthorized{Fingerprint: events.Fingerprint(tok.AccessToken), Runtime: "rt"})
	other := fleet.MustKey(t, "evil.kim.github")
	bad := []struct{ key, body, reason string }{
		{"acme.kim.github", "not json", "JSON"},
		{"acme.kim.github", strings.Replace(string(good), `"specversion":"1.0"`, `"specversion":"0.3"`, 1), "specversion"},
		{"acme.kim.github", strings.Replace(string(good), events.Fingerprint(tok.AccessToken), "", 1), "fingerprint"},
		{"acme.kim.git$hub", string(good), "key"},
		{"acme.kim.github", strings.Replace(string(good), `"subject":"acme.kim.github"`, `"subject":"`+other.String()+`"`, 1), "subject"},
	}
	// A runtime's bad report: the intake refuses it at once, naming what
	// is wrong, and it never reaches the work queue.
	for _, m := range bad {
		_, err := b.JS.Publish(context.Background(), "auth.401."+m.key, []byte(m.body))
		var apiErr *jetstream.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != 400 || !strings.Contains(strings.ToLower(apiErr.Description), strings.ToLower(m.reason)) {
			t.Errorf("a report with a bad %s: %v, want a 400 that names it", m.reason, err)
		}
	}
	// The same written straight into the work queue (by a refresher of
	// another version, or anyone with JetStream rights): the workers
	// terminate each with its reason instead of redelivering it forever.
	for _, m := range bad {
		if _, err := b.JS.Publish(context.Background(), "auth.work.401."+m.key, []byte(m.body)); err != nil {
			t.Fatalf("publish %s: %v", m.key, err)
		}
	}
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	w.WaitFor(t, "rotation behind the bad events", fleet.RotatedVersion(2))
	b.Settled(t)
	var terms []map[string]any
	fleet.Eventually(t, 10*time.Second, "a bad_input record per bad event", func() bool {
		terms = b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "bad_input"})
		return len(terms) >= len(bad)
	})
	if len(terms) != len(bad) {
		t.Fatalf("bad_input records = %d, want %d", len(terms), len(bad))
	}
	// Workers run concurrently: match reasons to records in any order.
	for i, m := range bad {
		found := false
		for _, rec := range terms {
			found = found || strings.Contains(strings.ToLower(fmt.Sprint(rec["detail"])), strings.ToLower(m.reason))
		}
		if !found {
			t.Errorf("bad event %d: no logged reason mentions %q", i, m.reason)
		}
	}
}

// Done-when 10: no token or secret reaches a log line or an error reply,
// and refresh tokens and client secrets are sealed in KV.
func TestSecretsNeverLeak(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 2, nil)
	key := fleet.MustKey(t, "acme.leak.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	rot := w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	newRT := b.Cred(t, key).RefreshToken.Reveal()
	// Then a failure path: the new refresh token is revoked.
	b.AS.Revoke(newRT)
	b.Publish401(t, key, rot.Rotated.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	// And bad registrations that carry secrets.
	_, err := b.TryRegister(key, tok, func(r *events.RegisterRequest) { r.TokenEndpoint = "http://example.com/token" })
	if err == nil {
		t.Fatal("register with a plain-http non-loopback endpoint was accepted")
	}
	canaries := []string{tok.AccessToken, tok.RefreshToken, rot.Rotated.AccessToken, newRT, fleet.ClientSecret}
	for _, c := range canaries {
		if strings.Contains(b.Logs.String(), c) {
			t.Errorf("a log line contains a secret (%.6s…)", c)
		}
		if strings.Contains(err.Error(), c) {
			t.Errorf("an error reply contains a secret (%.6s…)", c)
		}
	}
	kvb, err := b.JS.KeyValue(context.Background(), b.Subj.CredentialsBucket())
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kvb.Get(context.Background(), key.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{tok.RefreshToken, newRT, fleet.ClientSecret} {
		if strings.Contains(string(entry.Value()), c) {
			t.Errorf("KV holds a refresh token or client secret in plain text (%.6s…)", c)
		}
	}
}

// An authorization server that does not rotate answers without a refresh
// token (RFC 6749 §6): the stored one is carried forward and keeps working
// for the next generation.
func TestRefreshTokenCarriedForwardWithoutRotation(t *testing.T) {
	b := fleet.Setup(t)
	b.AS.SetRotation(false)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.carol.linear")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)

	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	v2 := w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
	if got := b.Cred(t, key).RefreshToken.Reveal(); got != tok.RefreshToken {
		t.Fatalf("stored refresh token changed without rotation; want the original carried forward")
	}
	b.Publish401(t, key, v2.Rotated.Fingerprint, "rt", true)
	w.WaitFor(t, "auth.rotated version 3", fleet.RotatedVersion(3))
	b.Settled(t)
	if got := b.AS.Calls(); got != 2 {
		t.Errorf("token-endpoint calls = %d, want 2", got)
	}
	if got := b.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
}
