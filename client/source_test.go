package client_test

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
)

var _ oauth2.TokenSource = (*client.Source)(nil)

// tokenRequests counts the auth.token requests for key. A non-queue
// subscriber gets a copy of every request the token service answers.
func tokenRequests(t *testing.T, b *bundle) func() int {
	t.Helper()
	sub, err := b.f.NC.SubscribeSync(b.f.Subj.Token(b.key))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := b.f.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	return func() int {
		// A request is routed to every subscriber before its reply is sent;
		// after a flush, one made before is in the pending queue.
		if err := b.f.NC.Flush(); err != nil {
			t.Fatal(err)
		}
		n, _, err := sub.Pending()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// considered is a token or needs_reauth a Source considered (its test hook).
type considered struct {
	from    string
	version int64
	applied bool
}

func hook(src *client.Source) <-chan considered {
	ch := make(chan considered, 64)
	client.SetEventHook(src, func(from string, version int64, applied bool) {
		ch <- considered{from, version, applied}
	})
	return ch
}

func waitSeen(t *testing.T, ch <-chan considered, want considered) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case s := <-ch:
			if s == want {
				return
			}
		case <-deadline:
			t.Fatalf("the Source never considered %+v", want)
		}
	}
}

func publishEvent(t *testing.T, b *bundle, p events.Payload) {
	t.Helper()
	data, err := events.Encode(b.key, "test", p)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.f.NC.Publish(b.f.Subj.Event(p.EventType(), b.key), data); err != nil {
		t.Fatal(err)
	}
}

// Done-when 4: the first Token fetches through auth.token; a rotation
// published by a pool replaces the local copy without another request; an
// older version is ignored.
func TestSourceFollowsRotations(t *testing.T) {
	b := setup(t, nil)
	requests := tokenRequests(t, b)
	src, _ := b.newSource(t)
	seen := hook(src)

	tok, err := src.Token()
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	if tok.AccessToken != b.tok.AccessToken || tok.Type() != "Bearer" || tok.Expiry.IsZero() {
		t.Fatalf("Token = fingerprint %s type %q expiry %v; want the registered token with its expiry",
			events.Fingerprint(tok.AccessToken), tok.Type(), tok.Expiry)
	}
	for range 10 {
		if _, err := src.Token(); err != nil {
			t.Fatal(err)
		}
	}
	if n := requests(); n != 1 {
		t.Fatalf("auth.token requests after 11 Token calls = %d, want 1", n)
	}

	w := b.f.Watch(t, b.key)
	b.f.Publish401(t, b.key, events.Fingerprint(b.tok.AccessToken), "test", true)
	v2 := w.WaitFor(t, "auth.rotated v2", fleet.RotatedVersion(2)).Rotated
	waitSeen(t, seen, considered{"rotated", 2, true})
	tok, err = src.Token()
	if err != nil || tok.AccessToken != v2.AccessToken {
		t.Fatalf("Token after rotation: fingerprint %s err %v; want v2 %s", events.Fingerprint(tok.AccessToken), err, v2.Fingerprint)
	}
	if n := requests(); n != 1 {
		t.Errorf("auth.token requests after the rotation = %d, want still 1", n)
	}

	// A late re-announcement of an older version must not win, nor an old
	// generation's needs_reauth.
	old := "at-stale-announcement"
	publishEvent(t, b, events.Rotated{AccessToken: old, TokenType: "Bearer", Fingerprint: events.Fingerprint(old), Version: 1})
	waitSeen(t, seen, considered{"rotated", 1, false})
	publishEvent(t, b, events.NeedsReauth{Reason: "invalid_grant", Version: 1})
	waitSeen(t, seen, considered{"needs_reauth", 1, false})
	if tok, err := src.Token(); err != nil || tok.AccessToken != v2.AccessToken {
		t.Errorf("Token after stale events: fingerprint %s err %v; want v2", events.Fingerprint(tok.AccessToken), err)
	}
	if n := requests(); n != 1 {
		t.Errorf("auth.token requests = %d, want still 1", n)
	}
}

// A needs_reauth event of the held generation turns Token into a
// *NeedsReauthError without a request; a re-registration's auth.rotated
// repairs it.
func TestSourceNeedsReauthAndRepair(t *testing.T) {
	b := setup(t, nil)
	requests := tokenRequests(t, b)
	src, _ := b.newSource(t)
	seen := hook(src)
	if _, err := src.Token(); err != nil {
		t.Fatal(err)
	}

	publishEvent(t, b, events.NeedsReauth{Reason: "invalid_grant", ErrorDescription: "grant revoked", Version: 1})
	waitSeen(t, seen, considered{"needs_reauth", 1, true})
	_, err := src.Token()
	var nre *client.NeedsReauthError
	if !errors.As(err, &nre) || nre.Reason != "invalid_grant" || nre.Version != 1 {
		t.Fatalf("Token = %v; want NeedsReauthError invalid_grant v1", err)
	}

	fresh := b.f.AS.Issue(fleet.ClientID)
	b.f.Register(t, b.key, fresh, nil)
	waitSeen(t, seen, considered{"rotated", 2, true})
	if tok, err := src.Token(); err != nil || tok.AccessToken != fresh.AccessToken {
		t.Fatalf("Token after re-registration: err %v; want the new login's token", err)
	}
	if n := requests(); n != 1 {
		t.Errorf("auth.token requests = %d, want 1", n)
	}
}

// A Source started while the credential needs re-auth learns it from the
// token service's 409.
func TestSourceNeedsReauthFromService(t *testing.T) {
	b := setup(t, func(r *events.RegisterRequest) { r.Token.RefreshToken = "" })
	w := b.f.Watch(t, b.key)
	b.f.Publish401(t, b.key, events.Fingerprint(b.tok.AccessToken), "test", true)
	w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })

	src, _ := b.newSource(t)
	_, err := src.Token()
	var nre *client.NeedsReauthError
	if !errors.As(err, &nre) || nre.Reason != "no_refresh_token" {
		t.Fatalf("Token = %v; want NeedsReauthError no_refresh_token", err)
	}
}

// Done-when 4 (b): an unknown key is a typed not-found error that says what
// to do.
func TestSourceUnknownKey(t *testing.T) {
	b := setup(t, nil)
	nc := b.f.NC
	src, err := client.New(nc, "acme.nobody.api")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	_, err = src.Token()
	if !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("Token for an unknown key: %v; want ErrNotFound", err)
	}
	if !strings.Contains(err.Error(), "register") {
		t.Errorf("the error does not say to register the credential: %v", err)
	}
}

// Without refreshers, Token says so instead of hanging.
func TestSourceNoRefreshers(t *testing.T) {
	f := fleet.Setup(t)
	src, err := client.New(f.NC, "acme.alice.api")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	_, err = src.Token()
	if !errors.Is(err, client.ErrUnavailable) || !strings.Contains(err.Error(), "cmd/refresher") {
		t.Fatalf("Token without refreshers: %v; want ErrUnavailable naming cmd/refresher", err)
	}
}

func TestNewRefusesBadInput(t *testing.T) {
	f := fleet.Setup(t)
	for _, tc := range []struct {
		name string
		key  string
		opts []client.Option
		want string
	}{
		{"bad key", "acme..api", nil, "part 2"},
		{"bad prefix", "acme.alice.api", []client.Option{client.WithPrefix("a b")}, "WithPrefix"},
		{"negative wait", "acme.alice.api", []client.Option{client.WithWaitTimeout(-time.Second), client.WithRequestTimeout(-time.Second)}, "WithRequestTimeout"},
		{"long runtime", "acme.alice.api", []client.Option{client.WithRuntime(strings.Repeat("r", events.MaxRuntimeLen+1))}, "WithRuntime"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := client.New(f.NC, tc.key, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v; want an error naming %q", err, tc.want)
			}
		})
	}
}

// Close unsubscribes and makes Token fail with ErrClosed.
func TestSourceClose(t *testing.T) {
	b := setup(t, nil)
	nc := natstest.Connect(t, b.f.Srv)
	if _, err := nc.Request(b.f.Subj.Token(b.key), nil, 5*time.Second); err != nil {
		t.Fatal(err) // creates the connection's shared reply subscription
	}
	before := nc.NumSubscriptions()
	src, err := client.New(nc, b.key.String())
	if err != nil {
		t.Fatal(err)
	}
	if got := nc.NumSubscriptions() - before; got != 2 {
		t.Fatalf("New made %d subscriptions, want 2", got)
	}
	if _, err := src.Token(); err != nil {
		t.Fatal(err)
	}
	if err := src.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := src.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := nc.NumSubscriptions() - before; got != 0 {
		t.Errorf("%d subscriptions left after Close", got)
	}
	if _, err := src.Token(); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Token after Close: %v; want ErrClosed", err)
	}
}

// Done-when 5: WithExpiring publishes auth.expiring for the held token
// before it expires, by the lead rule.
func TestSourceReportsExpiring(t *testing.T) {
	b := setup(t, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 4 })
	// Hold every refresh at the token endpoint, so the refreshers' own
	// schedule cannot replace the token before the client reports it.
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	b.f.AS.OnToken(func(*http.Request) { <-release })
	t.Cleanup(releaseOnce)

	sub, err := b.f.NC.SubscribeSync(b.f.Subj.Event(events.TypeExpiring, b.key))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.f.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	src, _ := b.newSource(t, client.WithExpiring(), client.WithRuntime("exp"))
	tok, err := src.Token()
	if err != nil {
		t.Fatal(err)
	}
	fp := events.Fingerprint(tok.AccessToken)

	deadline := time.Now().Add(20 * time.Second)
	for {
		msg, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("no auth.expiring from the client: %v", err)
		}
		ev, err := events.Decode(events.TypeExpiring, b.key, msg.Data)
		if err != nil {
			t.Fatalf("malformed auth.expiring: %v", err)
		}
		if ev.Source != "authbus/client/exp" {
			continue // the refreshers' scheduled one
		}
		if ev.Expiring.Fingerprint != fp || !ev.Expiring.ExpiresAt.Equal(tok.Expiry) {
			t.Errorf("auth.expiring = %+v; want fingerprint %s expires_at %v", *ev.Expiring, fp, tok.Expiry)
		}
		// Order, not speed. The report is made by the lead rule, never
		// before expires_at − lead (a bound load cannot break: a busy
		// machine only runs the timer later), for the token still held;
		// and the refresh it asks for comes after it. Whether it arrives
		// before the expiry itself depends on how busy the machine is.
		if lead := events.Lead(4 * time.Second); ev.Time.Before(tok.Expiry.Add(-lead)) {
			t.Errorf("auth.expiring made at %v, before expires_at − lead (%v − %v)", ev.Time, tok.Expiry, lead)
		}
		w := b.f.Watch(t, b.key)
		releaseOnce()
		w.WaitFor(t, "the rotation the report asks for", fleet.RotatedVersion(2))
		if got, want := msg.Header.Get(nats.MsgIdHdr), events.MsgID(events.TypeExpiring, b.key, fp); got != want {
			t.Errorf("Nats-Msg-Id = %q, want %q", got, want)
		}
		return
	}
}

func TestCleanURL(t *testing.T) {
	// The URL of an auth.401 event keeps no secret that URLs may carry.
	for in, want := range map[string]string{
		"https://u:p@api.example.com/v1/x?token=abc#f":         "https://api.example.com/v1/x",
		"https://api.example.com/?":                            "https://api.example.com/",
		"https://api.example.com/" + strings.Repeat("a", 3000): "https://api.example.com/" + strings.Repeat("a", events.MaxURLLen-len("https://api.example.com/")),
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := client.CleanURL(u); got != want {
			t.Errorf("CleanURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func tracerForTest() trace.Tracer { return otel.Tracer("client-test") }

// findSpan returns the ended span of traceID with the given name.
func findSpan(t *testing.T, traceID, name string) sdktrace.ReadOnlySpan {
	t.Helper()
	var found sdktrace.ReadOnlySpan
	fleet.Eventually(t, 5*time.Second, "span "+name+" ended", func() bool {
		for _, s := range spans.Ended() {
			if s.SpanContext().TraceID().String() == traceID && s.Name() == name {
				found = s
				return true
			}
		}
		return false
	})
	return found
}

func assertProducerSpan(t *testing.T, s sdktrace.ReadOnlySpan, subject string, key events.Key, fp, secret string) {
	t.Helper()
	if s.SpanKind() != trace.SpanKindProducer {
		t.Errorf("span %s kind = %v, want producer", s.Name(), s.SpanKind())
	}
	want := map[attribute.Key]string{
		"messaging.system":           "nats",
		"messaging.operation.type":   "send",
		"messaging.destination.name": subject,
		"authbus.credential.key":     key.String(),
		"authbus.fingerprint":        fp,
	}
	got := map[attribute.Key]string{}
	for _, kv := range s.Attributes() {
		got[kv.Key] = kv.Value.Emit()
		if strings.Contains(kv.Value.Emit(), secret) {
			t.Errorf("span attribute %s holds the access token", kv.Key)
		}
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("span %s attribute %s = %q, want %q", s.Name(), k, got[k], v)
		}
	}
}

// The auth.token request carries the caller's trace context.
func TestSourceRequestTraced(t *testing.T) {
	b := setup(t, nil)
	sub, err := b.f.NC.SubscribeSync(b.f.Subj.Token(b.key))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.f.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	src, _ := b.newSource(t)
	ctx, parent := tracerForTest().Start(context.Background(), "caller")
	if _, err := src.TokenContext(ctx); err != nil {
		t.Fatal(err)
	}
	parent.End()
	msg, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	traceID := parent.SpanContext().TraceID().String()
	if tp := msg.Header.Get("traceparent"); !strings.Contains(tp, traceID) {
		t.Errorf("traceparent = %q; want the caller's trace %s", tp, traceID)
	}
	span := findSpan(t, traceID, "send auth.token")
	if span.SpanKind() != trace.SpanKindProducer {
		t.Errorf("kind = %v", span.SpanKind())
	}
}

// attrOf returns the value of attribute k of s, or "".
func attrOf(s sdktrace.ReadOnlySpan, k attribute.Key) string {
	for _, kv := range s.Attributes() {
		if kv.Key == k {
			return kv.Value.Emit()
		}
	}
	return ""
}
