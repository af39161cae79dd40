package workers_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

func TestRegisterRefusesBadInputNamingTheField(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.val.github")
	for _, tc := range []struct{ name, body, field string }{
		{"not JSON", `{`, "JSON"},
		{"unknown field", `{"token":{"access_token":"a"},"token_endpoint":"https://as.example/token","client_id":"c","client_secert":"x"}`, "client_secert"},
		{"no access token", `{"token":{},"token_endpoint":"https://as.example/token","client_id":"c"}`, "token.access_token"},
		{"plain http", `{"token":{"access_token":"a"},"token_endpoint":"http://as.example/token","client_id":"c"}`, "https"},
		{"ambiguous expiry", `{"token":{"access_token":"a","expires_in":60,"expires_at":"2030-01-01T00:00:00Z"},"token_endpoint":"https://as.example/token","client_id":"c"}`, "expires_in"},
		{"bad auth style", `{"token":{"access_token":"a"},"token_endpoint":"https://as.example/token","client_id":"c","auth_style":"jwt"}`, "auth_style"},
		{"bad grant", `{"token":{"access_token":"a"},"token_endpoint":"https://as.example/token","client_id":"c","grant":"password"}`, "grant"},
		{"too large", `{"token":{"access_token":"` + strings.Repeat("a", events.MaxRegisterSize) + `"},"client_id":"c"}`, "65536"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := b.Request(t, b.Subj.Register(key), []byte(tc.body))
			if code != "400" {
				t.Fatalf("error code %q, want 400; body %s", code, body)
			}
			var er events.ErrorReply
			if err := json.Unmarshal(body, &er); err != nil || er.Error != events.CodeInvalidRequest {
				t.Fatalf("body %s: want an invalid_request error reply (%v)", body, err)
			}
			if !strings.Contains(er.ErrorDescription, tc.field) {
				t.Errorf("description %q does not name %q", er.ErrorDescription, tc.field)
			}
		})
	}
	if _, _, err := b.Store.Get(context.Background(), key); err == nil {
		t.Error("a refused registration was stored")
	}
}

func TestTokenReplies(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.tok.github")

	code, body := b.Request(t, b.Subj.Token(key), nil)
	if code != "404" || !strings.Contains(string(body), `"not_found"`) {
		t.Errorf("unknown credential: code %q body %s, want 404 not_found", code, body)
	}

	tok := b.AS.Issue(fleet.ClientID)
	reg := b.Register(t, key, tok, nil)
	code, body = b.Request(t, b.Subj.Token(key), nil)
	var r events.Rotated
	if code != "" || json.Unmarshal(body, &r) != nil || r.AccessToken != tok.AccessToken || r.Version != 1 || r.Fingerprint != reg.Fingerprint {
		t.Errorf("token reply: code %q body %s", code, body)
	}
	for _, secret := range []string{tok.RefreshToken, fleet.ClientSecret} {
		if strings.Contains(string(body), secret) {
			t.Error("the token reply carries a refresh token or client secret")
		}
	}

	b.AS.Revoke(tok.RefreshToken)
	w := b.Watch(t, key)
	b.Publish401(t, key, reg.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	code, body = b.Request(t, b.Subj.Token(key), nil)
	var er events.ErrorReply
	if code != "409" || json.Unmarshal(body, &er) != nil || er.Error != events.CodeNeedsReauth || er.Reason != "invalid_grant" {
		t.Errorf("needs_reauth credential: code %q body %s, want 409 needs_reauth/invalid_grant", code, body)
	}
}

// Registration is how a person repairs needs_reauth: new tokens, version
// bumped, state cleared, the kept needs_reauth purged, auth.rotated published.
func TestReRegistrationRepairsNeedsReauth(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.fix.github")
	tok := b.AS.Issue(fleet.ClientID)
	reg := b.Register(t, key, tok, nil)
	b.AS.Revoke(tok.RefreshToken)
	w := b.Watch(t, key)
	b.Publish401(t, key, reg.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	reauth, err := b.JS.Stream(context.Background(), b.Subj.ReauthStream())
	if err != nil {
		t.Fatal(err)
	}
	// Subscribers may see the event before the stream has stored it.
	fleet.Eventually(t, 5*time.Second, "needs_reauth kept in "+b.Subj.ReauthStream(), func() bool {
		_, err := reauth.GetLastMsgForSubject(context.Background(), b.Subj.Event(events.TypeNeedsReauth, key))
		return err == nil
	})

	fresh := b.AS.Issue(fleet.ClientID)
	reg2 := b.Register(t, key, fresh, nil)
	if reg2.Version != 2 || reg2.Fingerprint != events.Fingerprint(fresh.AccessToken) {
		t.Errorf("re-registration reply %+v, want version 2 with the new fingerprint", reg2)
	}
	w.WaitFor(t, "auth.rotated of the re-registration", fleet.RotatedVersion(2))
	if c := b.Cred(t, key); c.State != kv.StateActive || c.Reason != "" {
		t.Errorf("state %s/%s after re-registration, want active", c.State, c.Reason)
	}
	if _, err := reauth.GetLastMsgForSubject(context.Background(), b.Subj.Event(events.TypeNeedsReauth, key)); err == nil {
		t.Error("the kept needs_reauth was not purged by the re-registration")
	} else if !strings.Contains(err.Error(), "not found") {
		t.Errorf("reading the kept needs_reauth: %v", err)
	}
	// The repaired credential refreshes again.
	b.Publish401(t, key, reg2.Fingerprint, "rt", true)
	w.WaitFor(t, "rotation after repair", fleet.RotatedVersion(3))
}

// A proactive refresh: registration schedules an auth.expiring at
// expires_at − lead in the work-queue stream, and it refreshes the
// credential with no 401 from anyone. A token registered without a refresh
// token ends in needs_reauth (no_refresh_token) without a call.
func TestScheduledExpiringRefreshes(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 2, nil)
	key := fleet.MustKey(t, "acme.soon.github")
	tok := b.AS.Issue(fleet.ClientID)
	w := b.Watch(t, key)
	b.Register(t, key, tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 2 })
	w.WaitFor(t, "proactive rotation", fleet.RotatedVersion(2))
	b.Settled(t)
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}

	key2 := fleet.MustKey(t, "acme.nort.github")
	w2 := b.Watch(t, key2)
	b.Register(t, key2, tok, func(r *events.RegisterRequest) { r.Token.RefreshToken = ""; r.Token.ExpiresIn = 2 })
	ev := w2.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	if ev.NeedsReauth.Reason != "no_refresh_token" {
		t.Errorf("reason %q, want no_refresh_token", ev.NeedsReauth.Reason)
	}
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want still 1", got)
	}
}

// An auth.expiring for a token that is not due yet is acked without a call.
func TestExpiringNotDueIsAcked(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.later.github")
	tok := b.AS.Issue(fleet.ClientID)
	reg := b.Register(t, key, tok, nil)
	data, err := events.Encode(key, "test", events.Expiring{Fingerprint: reg.Fingerprint, ExpiresAt: reg.ExpiresAt})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.JS.Publish(context.Background(), b.Subj.Event(events.TypeExpiring, key), data,
		jetstream.WithMsgID(events.MsgID(events.TypeExpiring, key, reg.Fingerprint))); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 10*time.Second, "a not_due outcome logged", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "not_due"})) == 1
	})
	b.Settled(t)
	if got := b.AS.Calls(); got != 0 {
		t.Errorf("token-endpoint calls = %d, want 0", got)
	}
}
