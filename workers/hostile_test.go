package workers_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

// A token endpoint that answers a refresh with a redirect does not get the
// refresh token (or, in post style, the client secret) sent on to where it
// points: the redirect is the answer, a permanent unexpected_response.
func TestTokenRequestFollowsNoRedirect(t *testing.T) {
	for _, status := range []int{http.StatusTemporaryRedirect, http.StatusPermanentRedirect, http.StatusFound} {
		t.Run(http.StatusText(status), func(t *testing.T) {
			t.Parallel()
			b := fleet.Setup(t)
			elsewhere := authtest.New(t)
			elsewhere.AddClient(fleet.ClientID, fleet.ClientSecret)
			b.StartPools(t, 1, nil)
			key := fleet.MustKey(t, "acme.alice.github")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, func(r *events.RegisterRequest) { r.AuthStyle = events.AuthStylePost })
			w := b.Watch(t, key)

			b.AS.Fail(1, status, "", http.Header{"Location": {elsewhere.TokenURL()}})
			b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
			ev := w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
			b.Settled(t)
			if n := elsewhere.Calls(); n != 0 {
				t.Fatalf("the redirect was followed: %d calls reached its target with the refresh token and client secret", n)
			}
			if ev.NeedsReauth.Reason != "unexpected_response" || !strings.Contains(ev.NeedsReauth.ErrorDescription, "redirect") {
				t.Errorf("needs_reauth %+v, want unexpected_response describing the redirect", ev.NeedsReauth)
			}
			if n := b.AS.Calls(); n != 1 {
				t.Errorf("token-endpoint calls = %d, want 1", n)
			}
		})
	}
}

// An expires_in that is negative, zero, tiny, absurd or unreadable is
// stored as a documented safe lifetime: none (refreshed on 401 only), at
// least 10 s, at most a year. Never an already expired token, which
// refreshed again at once, forever; never an unreadable answer, whose
// retry presented the refresh token it had just redeemed.
func TestHostileExpiresIn(t *testing.T) {
	const floor, year = 10 * time.Second, 365 * 24 * time.Hour
	for _, tc := range []struct {
		raw      string // expires_in as the server writes it
		lifetime time.Duration
	}{
		{`-5`, 0},
		{`0`, 0},
		{`-99999999999`, 0},
		{`"soon"`, 0},
		{`null`, 0},
		{`1`, floor},
		{`1e30`, year},
		{`99999999999`, year},
		{`3600.5`, time.Hour},
		{`"7200"`, 2 * time.Hour},
	} {
		t.Run(tc.raw, func(t *testing.T) {
			t.Parallel()
			b := fleet.Setup(t)
			b.StartPools(t, 1, nil)
			key := fleet.MustKey(t, "acme.alice.github")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, nil)
			w := b.Watch(t, key)
			b.AS.RewriteAnswers(func(a map[string]json.RawMessage) { a["expires_in"] = json.RawMessage(tc.raw) })

			before := time.Now()
			b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
			w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
			b.Settled(t)
			c := b.Cred(t, key)
			switch {
			case tc.lifetime == 0:
				if !c.ExpiresAt.IsZero() {
					t.Errorf("expires_in %s stored as expiring at %v (received %v), want no expiry", tc.raw, c.ExpiresAt, c.ReceivedAt)
				}
			case c.ExpiresAt.Sub(c.ReceivedAt) != tc.lifetime || c.ReceivedAt.Before(before.Add(-time.Second)):
				t.Errorf("expires_in %s stored as a lifetime of %v, want %v", tc.raw, c.ExpiresAt.Sub(c.ReceivedAt), tc.lifetime)
			}
			if !c.Valid(time.Now()) {
				t.Errorf("the stored token counts as expired right after it was received")
			}
			if n, r := b.AS.Calls(), b.AS.Reuses(); n != 1 || r != 0 {
				t.Errorf("token calls %d, reuses %d; want 1 and 0", n, r)
			}
		})
	}
}

// An error_description or error code longer than an event can carry is
// cut to fit, so auth.needs_reauth is announced (it was encoded never, and
// the event redelivered forever); a record stored before the cut is
// announced cut too, and auth.token's reply is bounded as well.
func TestHostileErrorTextIsTruncated(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.alice.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)

	// '<' is written as six bytes by JSON, a line break would end a header.
	long := strings.Repeat("<\n", 20<<10)
	body, _ := json.Marshal(map[string]string{"error": "invalid_grant" + strings.Repeat("x", 20<<10), "error_description": long})
	b.AS.Fail(1, http.StatusBadRequest, string(body), nil)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	ev := w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	nr := ev.NeedsReauth
	if len(nr.Reason) > events.MaxReasonLen || !strings.HasPrefix(nr.Reason, "invalid_grant") ||
		len(nr.ErrorDescription) > events.MaxErrorDescriptionLen || !strings.HasSuffix(nr.ErrorDescription, "…") ||
		strings.Contains(nr.ErrorDescription, "\n") {
		t.Errorf("needs_reauth reason of %d bytes, description of %d bytes ending %q: want both cut to their limits, on one line",
			len(nr.Reason), len(nr.ErrorDescription), nr.ErrorDescription[max(0, len(nr.ErrorDescription)-8):])
	}

	// A record written before texts were bounded on storing.
	c, rev, err := b.Store.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	c.Reason, c.Description = strings.Repeat("r", 20<<10), long
	if _, err := b.Store.Update(context.Background(), c, rev); err != nil {
		t.Fatal(err)
	}
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-later", false)
	fleet.Eventually(t, 20*time.Second, "the stored needs_reauth is announced again", func() bool {
		return w.Count(func(ev *events.Event) bool { return ev.NeedsReauth != nil }) >= 2
	})
	code, reply := b.Request(t, b.Subj.Token(key), nil)
	var er events.ErrorReply
	if err := json.Unmarshal(reply, &er); err != nil || code != "409" || len(er.Reason) > events.MaxReasonLen ||
		len(er.ErrorDescription) > events.MaxErrorDescriptionLen {
		t.Errorf("auth.token reply %s with a reason of %d bytes and a description of %d (%v); want 409, both bounded",
			code, len(er.Reason), len(er.ErrorDescription), err)
	}
	b.Settled(t)
}

// An answer whose access token or token type cannot be announced (too
// long, control characters, a type with a space) ends the refresh in
// needs_reauth, reason unusable_token, instead of a retry per 401 or a
// token nobody receives. The refresh token that answer issued is kept
// (the one sent is spent), and no later event presents the spent one.
func TestUnannounceableTokenParksCredential(t *testing.T) {
	for _, tc := range []struct {
		name   string
		member string
		value  string
	}{
		{"access token too long", "access_token", strings.Repeat("a", events.MaxAccessTokenSize+1)},
		{"access token with a line break", "access_token", "at-1\r\nX-Injected: 1"},
		{"token type with a space", "token_type", "Bearer extra"},
		{"token type too long", "token_type", strings.Repeat("B", 200)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := fleet.Setup(t)
			b.StartPools(t, 1, nil)
			key := fleet.MustKey(t, "acme.alice.github")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, nil)
			w := b.Watch(t, key)
			v, _ := json.Marshal(tc.value)
			b.AS.RewriteAnswers(func(a map[string]json.RawMessage) { a[tc.member] = v })

			fp := events.Fingerprint(tok.AccessToken)
			b.Publish401(t, key, fp, "rt", true)
			ev := w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
			if ev.NeedsReauth.Reason != "unusable_token" || !strings.Contains(ev.NeedsReauth.ErrorDescription, tc.member) ||
				!strings.Contains(ev.NeedsReauth.ErrorDescription, "log in again") {
				t.Errorf("needs_reauth %+v, want reason unusable_token naming %s and the fix", ev.NeedsReauth, tc.member)
			}
			b.Settled(t)
			c := b.Cred(t, key)
			issued := b.AS.CurrentRefreshToken(tok.RefreshToken)
			if c.State != kv.StateNeedsReauth || c.Reason != "unusable_token" || c.RefreshToken.Reveal() != issued || issued == tok.RefreshToken {
				t.Errorf("stored state %s/%s, refresh token kept: %v; want needs_reauth/unusable_token holding the issued refresh token",
					c.State, c.Reason, c.RefreshToken.Reveal() == issued)
			}
			if c.AccessToken.Reveal() != tok.AccessToken {
				t.Error("the unannounceable access token was stored")
			}

			// Later events are answered from the store: no call, no reuse.
			b.Publish401(t, key, fp, "rt-later", false)
			fleet.Eventually(t, 20*time.Second, "needs_reauth announced again", func() bool {
				return w.Count(func(ev *events.Event) bool { return ev.NeedsReauth != nil }) >= 2
			})
			b.Settled(t)
			if n, r := b.AS.Calls(), b.AS.Reuses(); n != 1 || r != 0 {
				t.Errorf("token calls %d, reuses %d; want 1 and 0", n, r)
			}
			if n := w.Count(func(ev *events.Event) bool { return ev.Rotated != nil && ev.Rotated.Version > 1 }); n != 0 {
				t.Errorf("%d auth.rotated announced a new version", n)
			}
		})
	}
}
