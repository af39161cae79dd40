package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

// register reads token responses as OAuth libraries save them. An absolute
// expiry wins over expires_in, which a saved x/oauth2 Token carries from
// when it was received.
func TestRegisterReadsSavedTokenResponses(t *testing.T) {
	t.Parallel()
	b := setup(t)
	expiry := time.Now().Add(90 * time.Minute).UTC().Truncate(time.Second)
	tok := b.AS.Issue(fleet.ClientID)
	saved, err := json.Marshal(&oauth2.Token{AccessToken: tok.AccessToken, TokenType: "Bearer", RefreshToken: tok.RefreshToken, Expiry: expiry, ExpiresIn: 3600})
	if err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		name, stdin string
		want        time.Time // zero: about an hour from now
	}{
		{"x/oauth2 Token", string(saved), expiry},
		{"token response", fmt.Sprintf(`{"access_token":%q,"token_type":"bearer","refresh_token":%q,"expires_in":"3600","scope":"a b","id_token":"x"}`, tok.AccessToken, tok.RefreshToken), time.Time{}},
		{"python expires_at", fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"expires_in":3600,"expires_at":%d.25}`, tok.AccessToken, tok.RefreshToken, expiry.Unix()), expiry.Add(time.Second)},
		{"RFC 3339 expires_at", fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"expires_at":%q}`, tok.AccessToken, tok.RefreshToken, expiry.Format(time.RFC3339)), expiry},
	} {
		key := fmt.Sprintf("acme.file%d.github", i)
		before := time.Now()
		r := b.publisher(t, tc.stdin, "register", "--token-endpoint", b.AS.TokenURL(), "--client-id", fleet.ClientID,
			"--token-file", "-", "--json", key).want(t, 0)
		reply := mustJSON[events.RegisterReply](t, r.out)
		if reply.Fingerprint != events.Fingerprint(tok.AccessToken) || reply.Version != 1 {
			t.Errorf("%s: reply %+v", tc.name, reply)
		}
		want := tc.want
		if want.IsZero() {
			// expires_in counts from the registration, which happened
			// between before and now: an order, whatever the load.
			if earliest, latest := before.Add(time.Hour).Truncate(time.Second), time.Now().Add(time.Hour); reply.ExpiresAt.Before(earliest) || reply.ExpiresAt.After(latest) {
				t.Errorf("%s: expires_at %v, want an hour after the registration [%v, %v]", tc.name, reply.ExpiresAt, earliest, latest)
			}
		} else if !reply.ExpiresAt.Equal(want) {
			t.Errorf("%s: expires_at %v, want %v", tc.name, reply.ExpiresAt, want)
		}
		if got := b.Cred(t, fleet.MustKey(t, key)).RefreshToken.Reveal(); got != tok.RefreshToken {
			t.Errorf("%s: the refresh token was not stored", tc.name)
		}
	}
}

// register takes the tokens from flags and the environment too, and says
// what it registered without showing a token.
func TestRegisterFromFlagsAndEnvironment(t *testing.T) {
	// Not parallel: it sets the environment.
	b := setup(t)
	tok := b.AS.Issue(fleet.ClientID)
	t.Setenv("AUTHBUS_REFRESH_TOKEN", tok.RefreshToken)
	r := b.publisher(t, "", "register", "--token-endpoint", b.AS.TokenURL(), "--client-id", fleet.ClientID,
		"--access-token", tok.AccessToken, "--expires-in", "600", "acme.flags.github").want(t, 0)
	if !strings.HasPrefix(r.out, "registered acme.flags.github: version 1, fingerprint "+events.Fingerprint(tok.AccessToken)+", expires 20") {
		t.Errorf("register output: %q", r.out)
	}
	if got := b.Cred(t, fleet.MustKey(t, "acme.flags.github")).RefreshToken.Reveal(); got != tok.RefreshToken {
		t.Error("the refresh token from AUTHBUS_REFRESH_TOKEN was not stored")
	}
	mustNotContain(t, "register output", r.out+r.errOut, tok.AccessToken, tok.RefreshToken)
}

// token prints the access token and nothing else, for $(publisher token
// KEY); --json prints the auth.token reply; neither has the refresh token.
func TestTokenPrintsOnlyTheAccessToken(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, "acme.alice.github", tok)

	r := b.publisher(t, "", "token", "acme.alice.github").want(t, 0)
	if r.out != tok.AccessToken+"\n" {
		t.Errorf("token printed %q, want the access token and a newline", r.out)
	}
	// Flags after the key work too.
	r = b.publisher(t, "", "token", "acme.alice.github", "--json").want(t, 0)
	rot := mustJSON[events.Rotated](t, r.out)
	if rot.AccessToken != tok.AccessToken || rot.Version != 1 || rot.Fingerprint != events.Fingerprint(tok.AccessToken) || rot.TokenType != "Bearer" {
		t.Errorf("token --json: %+v", rot)
	}
	for _, out := range []string{r.out, r.errOut} {
		mustNotContain(t, "token output", out, tok.RefreshToken, fleet.ClientSecret)
	}

	r = b.publisher(t, "", "token", "acme.nobody.github").want(t, 3)
	if !strings.Contains(r.errOut, "not_found: credential acme.nobody.github is not registered") || r.out != "" {
		t.Errorf("unknown key: stdout %q stderr %q", r.out, r.errOut)
	}
}

// 401 publishes through JetStream with the de-duplicating Nats-Msg-Id and
// the fingerprint (never the token); the refresh follows. expiring does the
// same for auth.expiring; without token flags both use the current token.
func TestReportsPublishWithMsgIDAndFingerprint(t *testing.T) {
	t.Parallel()
	b := setup(t)
	key := "acme.bob.github"
	k := fleet.MustKey(t, key)
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, key, tok)
	fp := events.Fingerprint(tok.AccessToken)

	// A core subscription sees what the stream stores.
	seen := make(chan *nats.Msg, 16)
	for _, typ := range []events.Type{events.Type401, events.TypeExpiring} {
		sub, err := b.NC.ChanSubscribe(b.Subj.Event(typ, k), seen)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	next := func() *nats.Msg {
		t.Helper()
		select {
		case m := <-seen:
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("no event reached the subject")
			return nil
		}
	}
	w := b.Watch(t, k)

	r := b.publisher(t, "", "401", "--access-token", tok.AccessToken, "--url", "https://api.example/v1/x?api_key=SECRET#frag", "--json", key).want(t, 0)
	res := mustJSON[publishResult](t, r.out)
	if res.Subject != "auth.401."+key || res.MsgID != events.MsgID(events.Type401, k, fp) || res.Fingerprint != fp || res.Stream != b.Subj.EventsStream() || res.Duplicate {
		t.Errorf("401 --json: %+v", res)
	}
	m := next()
	if got := m.Header.Get(jetstream.MsgIDHeader); got != res.MsgID {
		t.Errorf("Nats-Msg-Id %q, want %q", got, res.MsgID)
	}
	ev, err := events.Decode(events.Type401, k, m.Data)
	if err != nil {
		t.Fatalf("published 401 does not decode: %v", err)
	}
	if ev.Unauthorized.Fingerprint != fp || ev.Unauthorized.Status != 401 || ev.Unauthorized.URL != "https://api.example/v1/x" {
		t.Errorf("401 data: %+v", ev.Unauthorized)
	}
	mustNotContain(t, "the published 401", string(m.Data), tok.AccessToken, "SECRET")
	w.WaitFor(t, "rotation after the 401", fleet.RotatedVersion(2))

	// The same report again, inside the duplicate window: dropped.
	r = b.publisher(t, "", "401", "--fingerprint", fp, key).want(t, 0)
	if !strings.Contains(r.out, "duplicate") {
		t.Errorf("second 401: %q, want it reported as a duplicate", r.out)
	}
	next()

	// No token flags: the current token (version 2) is meant; --wait sees
	// its refresh.
	r = b.publisher(t, "", "401", "--wait", "20s", key).want(t, 0)
	if !strings.Contains(r.out, "published auth.401."+key) || !strings.Contains(r.out, "rotated: version 3") {
		t.Errorf("401 --wait: %q", r.out)
	}
	if m := next(); mustDecode(t, events.Type401, k, m).Unauthorized.Fingerprint == fp {
		t.Error("401 without token flags reported the old token, not the current one")
	}

	r = b.publisher(t, "", "expiring", "--json", key).want(t, 0)
	res = mustJSON[publishResult](t, r.out)
	cur := b.Cred(t, k)
	m = next()
	exp := mustDecode(t, events.TypeExpiring, k, m).Expiring
	if exp.Fingerprint != cur.Fingerprint || !exp.ExpiresAt.Equal(cur.ExpiresAt.Truncate(time.Second)) && !exp.ExpiresAt.Equal(cur.ExpiresAt) ||
		m.Header.Get(jetstream.MsgIDHeader) != events.MsgID(events.TypeExpiring, k, cur.Fingerprint) || res.Subject != "auth.expiring."+key {
		t.Errorf("expiring: published %+v (msg id %q), credential fingerprint %s expires %v", exp, m.Header.Get(jetstream.MsgIDHeader), cur.Fingerprint, cur.ExpiresAt)
	}
	r = b.publisher(t, "", "expiring", "--access-token", "some-other-token", "--expires-at", "2030-01-02T03:04:05Z", key).want(t, 0)
	if !strings.Contains(r.out, "published auth.expiring."+key+": stream AUTH_EVENTS sequence") {
		t.Errorf("expiring: %q", r.out)
	}
	if e := mustDecode(t, events.TypeExpiring, k, next()).Expiring; e.Fingerprint != events.Fingerprint("some-other-token") || e.ExpiresAt.Year() != 2030 {
		t.Errorf("expiring with flags: %+v", e)
	}

	// A report for an unregistered key without token flags cannot find
	// the current token.
	r = b.publisher(t, "", "401", "acme.nobody.github").want(t, 3)
	if !strings.Contains(r.errOut, "current token could not be read") {
		t.Errorf("401 for unknown key: %s", r.errOut)
	}
}

// 401 --wait ends with exit 4 when the answer is needs_reauth.
func TestReportWaitSeesNeedsReauth(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, "acme.carol.github", tok)
	b.AS.Revoke(tok.RefreshToken)
	r := b.publisher(t, "", "401", "--wait", "20s", "--json", "acme.carol.github").want(t, 4)
	res := mustJSON[publishResult](t, r.out)
	if res.Outcome == nil || res.Outcome.Type != events.TypeNeedsReauth || res.Outcome.Reason != "invalid_grant" {
		t.Errorf("outcome %+v, want needs_reauth invalid_grant", res.Outcome)
	}
	if !strings.Contains(r.errOut, "log in again and register the new tokens") {
		t.Errorf("stderr: %s", r.errOut)
	}
	// token says the same, with the same exit status.
	r = b.publisher(t, "", "token", "acme.carol.github").want(t, 4)
	if !strings.Contains(r.errOut, "needs_reauth") {
		t.Errorf("token of a needs_reauth credential: %s", r.errOut)
	}
}

// 401 --wait does not take a re-announcement of the very token it reported
// (answering someone else's stale 401) for the outcome: that token was
// refused; the wait ends with the refresh.
func TestReportWaitIgnoresTheReportedToken(t *testing.T) {
	t.Parallel()
	b := setup(t)
	key := "acme.heidi.github"
	k := fleet.MustKey(t, key)
	old := b.AS.Issue(fleet.ClientID)
	b.register(t, key, old)
	cur := b.AS.Issue(fleet.ClientID)
	b.register(t, key, cur) // version 2; old is stale now

	inCall, release := make(chan struct{}), make(chan struct{})
	var called, released sync.Once
	b.AS.OnToken(func(*http.Request) {
		called.Do(func() { close(inCall) })
		<-release
	})
	unblock := func() { released.Do(func() { close(release) }) }
	t.Cleanup(unblock) // the server cannot close while a call is blocked
	done := make(chan result, 1)
	go func() { done <- b.publisher(t, "", "401", "--wait", "20s", "--access-token", cur.AccessToken, key) }()
	select {
	case <-inCall: // the 401 is out and its refresh is in the token endpoint
	case <-time.After(20 * time.Second):
		t.Fatal("the 401 caused no token-endpoint call")
	}

	w := b.Watch(t, k)
	b.Publish401(t, k, events.Fingerprint(old.AccessToken), "someone-stale", true)
	w.WaitFor(t, "re-announcement of the current token", fleet.RotatedVersion(2))
	unblock()
	r := (<-done).want(t, 0)
	if !strings.Contains(r.out, "rotated: version 3") {
		t.Errorf("401 --wait ended with %q, want the refresh (version 3)", r.out)
	}
}

func mustDecode(t *testing.T, typ events.Type, k events.Key, m *nats.Msg) *events.Event {
	t.Helper()
	ev, err := events.Decode(typ, k, m.Data)
	if err != nil {
		t.Fatalf("published %s does not decode: %v", typ, err)
	}
	return ev
}

// watch prints events without tokens, as lines or as CloudEvents JSON.
func TestWatchHidesTokens(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tok := b.AS.Issue(fleet.ClientID)

	type watcher struct {
		stdout, stderr fleet.LogBuffer
		done           chan int
	}
	start := func(args ...string) *watcher {
		w := &watcher{done: make(chan int, 1)}
		go func() {
			w.done <- run(context.Background(), append([]string{"watch", "--nats-url", b.url, "--for", "30s"}, args...), strings.NewReader(""), &w.stdout, &w.stderr)
		}()
		fleet.Eventually(t, 10*time.Second, "watch subscribed", func() bool { return strings.Contains(w.stderr.String(), "watching") })
		return w
	}
	wait := func(w *watcher) string {
		t.Helper()
		select {
		case code := <-w.done:
			if code != 0 {
				t.Fatalf("watch exit %d:\n%s", code, w.stderr.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatal("watch did not end")
		}
		return w.stdout.String()
	}
	asJSON := start("--json", "--count", "2", "acme")
	lines := start("--count", "2", "--types", "rotated,401", "acme.*.github")
	shown := start("--count", "1", "--show-tokens", "acme.dave.github")

	b.register(t, "acme.dave.github", tok)
	b.publisher(t, "", "401", "--access-token", tok.AccessToken, "acme.dave.github").want(t, 0)

	out := wait(asJSON)
	var versions []int64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		env := mustJSON[events.Envelope](t, line)
		var data events.Rotated
		if err := json.Unmarshal(env.Data, &data); err != nil || env.Type != events.TypeRotated || env.Subject != "acme.dave.github" {
			t.Errorf("watch --json line: %s", line)
		}
		if data.AccessToken != "[hidden]" {
			t.Errorf("watch --json shows access_token %q", data.AccessToken)
		}
		versions = append(versions, data.Version)
	}
	if len(versions) != 2 || versions[0] != 1 || versions[1] != 2 {
		t.Errorf("watch --json versions %v, want [1 2]", versions)
	}
	out = wait(lines)
	if !strings.Contains(out, "auth.rotated acme.dave.github version=1 fingerprint="+events.Fingerprint(tok.AccessToken)) ||
		!strings.Contains(out, "auth.401 acme.dave.github fingerprint="+events.Fingerprint(tok.AccessToken)) {
		t.Errorf("watch lines:\n%s", out)
	}
	newTok := b.Cred(t, fleet.MustKey(t, "acme.dave.github")).AccessToken.Reveal()
	for _, w := range []*watcher{asJSON, lines} {
		mustNotContain(t, "watch output", w.stdout.String()+w.stderr.String(), tok.AccessToken, newTok, tok.RefreshToken)
	}
	if out := wait(shown); !strings.Contains(out, "access_token="+tok.AccessToken) {
		t.Errorf("watch --show-tokens:\n%s", out)
	}

	// Interrupted (its context ends): exit 0, nothing printed.
	ctx, cancel := context.WithCancel(context.Background())
	var o, e fleet.LogBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"watch", "--nats-url", b.url, "other"}, strings.NewReader(""), &o, &e)
	}()
	fleet.Eventually(t, 10*time.Second, "watch subscribed", func() bool { return strings.Contains(e.String(), "watching auth.rotated.other.>") })
	cancel()
	if code := <-done; code != 0 || o.String() != "" {
		t.Errorf("interrupted watch: exit %d, stdout %q", code, o.String())
	}
}

// status shows one credential in detail, or every credential of a tenant
// or pattern, from the buckets; never a token.
func TestStatusOfKeyAndTenant(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	var secrets []string
	for _, key := range []string{"acme.alice.github", "acme.bob.github", "acme.bob.slack", "globex.alice.github"} {
		tok := b.AS.Issue(fleet.ClientID)
		b.register(t, key, tok)
		secrets = append(secrets, tok.AccessToken, tok.RefreshToken)
	}
	// bob.github: rotated once (version 2), then needs_reauth.
	w := b.Watch(t, fleet.MustKey(t, "acme.bob.github"))
	b.publisher(t, "", "401", "--wait", "20s", "acme.bob.github").want(t, 0)
	b.AS.Revoke(b.Cred(t, fleet.MustKey(t, "acme.bob.github")).RefreshToken.Reveal())
	b.publisher(t, "", "401", "acme.bob.github").want(t, 0)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	fleet.Eventually(t, 10*time.Second, "needs_reauth stored", func() bool {
		return b.Cred(t, fleet.MustKey(t, "acme.bob.github")).State == kv.StateNeedsReauth
	})
	// A refresher holds alice's lease.
	leases, err := kv.NewLeases(ctx, b.JS, kv.LeaseConfig{Bucket: b.Subj.LeasesBucket(), TTL: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	lease, err := leases.Claim(ctx, fleet.MustKey(t, "acme.alice.github"), "refresher-on-host-7", kv.Read{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lease.Release(context.Background()) })
	for _, key := range []string{"acme.alice.github", "acme.bob.github"} {
		secrets = append(secrets, b.Cred(t, fleet.MustKey(t, key)).AccessToken.Reveal())
	}

	r := b.publisher(t, "", "status", "--json", "acme").want(t, 0)
	list := mustJSON[[]credStatus](t, r.out)
	if len(list) != 3 {
		t.Fatalf("status acme listed %d credentials, want 3:\n%s", len(list), r.out)
	}
	byKey := map[string]credStatus{}
	for _, c := range list {
		byKey[c.Key] = c
	}
	alice, bob, slack := byKey["acme.alice.github"], byKey["acme.bob.github"], byKey["acme.bob.slack"]
	if alice.Version != 1 || alice.State != "active" || !alice.LeaseHeld || alice.LeaseHolder != "refresher-on-host-7" ||
		alice.ExpiresIn == nil || *alice.ExpiresIn < 3500 || alice.NextRefresh.IsZero() || !alice.HasRefreshToken ||
		alice.ClientID != fleet.ClientID || alice.Fingerprint == "" || alice.ReceivedAt.IsZero() {
		t.Errorf("alice: %+v", alice)
	}
	if bob.Version != 2 || bob.State != "needs_reauth" || bob.Reason != "invalid_grant" || bob.LeaseHeld {
		t.Errorf("bob: %+v", bob)
	}
	if slack.Version != 1 || slack.State != "active" || slack.LeaseHeld {
		t.Errorf("slack: %+v", slack)
	}
	if _, ok := byKey["globex.alice.github"]; ok {
		t.Error("status acme listed another tenant's credential")
	}

	r = b.publisher(t, "", "status", "acme").want(t, 0)
	for _, want := range []string{"KEY", "acme.alice.github", "held by refresher-on-host-7", "acme.bob.github", "needs_reauth (invalid_grant)", "acme.bob.slack"} {
		if !strings.Contains(r.out, want) {
			t.Errorf("status acme table lacks %q:\n%s", want, r.out)
		}
	}
	r = b.publisher(t, "", "status", "acme.*.github", "globex").want(t, 0)
	if n := strings.Count(r.out, "\n"); n != 4 || strings.Contains(r.out, "slack") {
		t.Errorf("status acme.*.github globex: want a header and 3 lines:\n%s", r.out)
	}
	r = b.publisher(t, "", "status", "acme.alice.github").want(t, 0)
	for _, want := range []string{"key:", "acme.alice.github", "version:", "state:", "active", "expires:", "received:", "next refresh:", "lease:", "held by refresher-on-host-7", "refresh token:", "yes", "token endpoint:", b.AS.TokenURL()} {
		if !strings.Contains(r.out, want) {
			t.Errorf("status KEY lacks %q:\n%s", want, r.out)
		}
	}
	all := b.publisher(t, "", "status", "--json").want(t, 0)
	if n := len(mustJSON[[]credStatus](t, all.out)); n != 4 {
		t.Errorf("status with no pattern listed %d, want 4", n)
	}
	for _, out := range []string{r.out, all.out} {
		mustNotContain(t, "status output", out, append(secrets, fleet.ClientSecret)...)
	}

	r = b.publisher(t, "", "status", "acme.nobody.github").want(t, 3)
	if !strings.Contains(r.errOut, "not registered") {
		t.Errorf("status of unknown key: %s", r.errOut)
	}
	r = b.publisher(t, "", "status", "initech").want(t, 0)
	if r.out != "" || !strings.Contains(r.errOut, "no credentials match initech") {
		t.Errorf("status of an empty tenant: %q %q", r.out, r.errOut)
	}
	r = b.publisher(t, "", "--prefix", "other", "status", "acme").want(t, 1)
	if !strings.Contains(r.errOut, "OTHER_CREDENTIALS not found") || !strings.Contains(r.errOut, "--prefix") {
		t.Errorf("status with a wrong prefix: %s", r.errOut)
	}
}

// delete forgets a credential: token then answers not_found; revoke does
// the same and says the tokens stay valid at the server.
func TestDeleteMakesTokenNotFound(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.register(t, "acme.erin.github", b.AS.Issue(fleet.ClientID))
	b.register(t, "acme.frank.github", b.AS.Issue(fleet.ClientID))
	b.publisher(t, "", "token", "acme.erin.github").want(t, 0)

	r := b.publisher(t, "", "delete", "acme.erin.github").want(t, 0)
	if r.out != "forgot acme.erin.github: removed the record and the pending refresh\n" {
		t.Errorf("delete output %q", r.out)
	}
	r = b.publisher(t, "", "token", "acme.erin.github").want(t, 3)
	if !strings.Contains(r.errOut, "not_found") {
		t.Errorf("token after delete: %s", r.errOut)
	}
	work, err := b.JS.Stream(ctx, b.Subj.SchedulesStream())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := work.GetLastMsgForSubject(ctx, b.Subj.Schedule(fleet.MustKey(t, "acme.erin.github"))); err == nil {
		t.Error("the pending refresh survived delete")
	}
	b.publisher(t, "", "token", "acme.frank.github").want(t, 0)

	r = b.publisher(t, "", "delete", "--json", "acme.erin.github").want(t, 3)
	got := mustJSON[forgetResult](t, r.out)
	if got.Key != "acme.erin.github" || got.Forgotten != (workers.Forgotten{}) {
		t.Errorf("second delete --json: %+v", got)
	}

	b.publisher(t, "", "delete", "acme.frank.github").want(t, 0)
	b.publisher(t, "", "token", "acme.frank.github").want(t, 3)
	// The key can be registered again, from version 1.
	if reply := b.register(t, "acme.frank.github", b.AS.Issue(fleet.ClientID)); reply.Version != 1 {
		t.Errorf("re-registered after delete: version %d", reply.Version)
	}
}

// Every publish and request carries the trace context of a span the
// publisher starts, under a parent given in TRACEPARENT; requests go out
// on the --nats-inbox-prefix a tenant user is limited to.
func TestTraceContextAndInboxPrefix(t *testing.T) {
	// Not parallel: it sets the global tracer provider and the environment.
	b := setup(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() { otel.SetTracerProvider(prev); _ = tp.Shutdown(context.Background()) })
	const parentTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	t.Setenv("TRACEPARENT", "00-"+parentTrace+"-00f067aa0ba902b7-01")

	key := fleet.MustKey(t, "acme.grace.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, key.String(), tok)
	seen := make(chan *nats.Msg, 8)
	for _, subject := range []string{b.Subj.Event(events.Type401, key), b.Subj.Token(key)} {
		sub, err := b.NC.ChanSubscribe(subject, seen)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	b.publisher(t, "", "--nats-inbox-prefix", "_INBOX_acme", "401", key.String()).want(t, 0)

	spans := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range rec.Ended() {
		spans[s.Name()] = s
	}
	cmdSpan := spans["publisher 401"]
	if cmdSpan == nil {
		t.Fatalf("no span for the command; ended: %v", spans)
	}
	for _, want := range []struct {
		name   string
		kind   trace.SpanKind
		parent string
	}{
		{"publisher 401", trace.SpanKindInternal, "00f067aa0ba902b7"},
		{"send auth.token", trace.SpanKindProducer, cmdSpan.SpanContext().SpanID().String()},
		{"send auth.401", trace.SpanKindProducer, cmdSpan.SpanContext().SpanID().String()},
	} {
		s, ok := spans[want.name]
		if !ok {
			t.Fatalf("no span %q; ended: %v", want.name, spans)
		}
		if s.SpanKind() != want.kind || s.SpanContext().TraceID().String() != parentTrace || s.Parent().SpanID().String() != want.parent {
			t.Errorf("span %s: kind %v trace %s parent %s, want kind %v trace %s parent %s", want.name,
				s.SpanKind(), s.SpanContext().TraceID(), s.Parent().SpanID(), want.kind, parentTrace, want.parent)
		}
	}
	for range 2 {
		select {
		case m := <-seen:
			var s sdktrace.ReadOnlySpan
			if strings.Contains(m.Subject, ".token.") {
				s = spans["send auth.token"]
				if !strings.HasPrefix(m.Reply, "_INBOX_acme.") {
					t.Errorf("token request reply subject %q, want the inbox prefix _INBOX_acme", m.Reply)
				}
			} else {
				s = spans["send auth.401"]
			}
			want := fmt.Sprintf("00-%s-%s-01", s.SpanContext().TraceID(), s.SpanContext().SpanID())
			if got := m.Header.Get("traceparent"); got != want {
				t.Errorf("%s: traceparent %q, want %q (the publisher's span)", m.Subject, got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the request or the publish did not arrive")
		}
	}
}
