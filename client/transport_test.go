package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
)

// bundle is what a client test needs: a fleet with running pools, one
// registered credential and an API that trusts the fleet's authorization
// server.
type bundle struct {
	f   *fleet.Fleet
	key events.Key
	tok authtest.Tokens // as registered, version 1
	api *fleet.ResourceServer
}

func setup(t testing.TB, tune func(*events.RegisterRequest)) *bundle {
	t.Helper()
	f := fleet.Setup(t)
	f.StartPools(t, 2, nil)
	key := fleet.MustKey(t, "acme.alice.api")
	tok := f.AS.Issue(fleet.ClientID)
	f.Register(t, key, tok, tune)
	return &bundle{f: f, key: key, tok: tok, api: f.NewResourceServer(t)}
}

// newSource returns a Source on a connection of its own, as a runtime
// process would have, closed when the test ends.
func (b *bundle) newSource(t testing.TB, opts ...client.Option) (*client.Source, *nats.Conn) {
	t.Helper()
	nc := natstest.Connect(t, b.f.Srv)
	src, err := client.New(nc, b.key.String(), opts...)
	if err != nil {
		t.Fatalf("client.New: %v", err)
	}
	t.Cleanup(func() {
		if err := src.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return src, nc
}

// httpClient returns an http.Client over src whose connections are closed
// when the test ends.
func httpClient(t testing.TB, src *client.Source) *http.Client {
	base := &http.Transport{MaxIdleConnsPerHost: 128}
	t.Cleanup(base.CloseIdleConnections)
	return &http.Client{Transport: &client.Transport{Source: src, Base: base}}
}

// get sends a GET tagged with id and returns the status and body.
func get(ctx context.Context, hc *http.Client, url, id string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set(fleet.RequestIDHeader, id)
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

func mustGet200(t testing.TB, hc *http.Client, url, id string) {
	t.Helper()
	status, body, err := get(context.Background(), hc, url, id)
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET %s: status %d body %q err %v; want 200", id, status, body, err)
	}
}

// storm sends n concurrent GETs per client, all released at once, and
// checks that each ends 200 after at most one retry.
func storm(t *testing.T, b *bundle, clients []*http.Client, n int) {
	t.Helper()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for c, hc := range clients {
		for i := range n {
			wg.Go(func() {
				<-start
				id := fmt.Sprintf("c%d-r%d", c, i)
				status, body, err := get(context.Background(), hc, b.api.URL, id)
				if err != nil || status != http.StatusOK {
					t.Errorf("%s: status %d body %q err %v; want 200", id, status, body, err)
				}
				if hits := b.api.HitsFor(id); hits > 2 {
					t.Errorf("%s reached the API %d times; want at most 2 (one retry)", id, hits)
				}
			})
		}
	}
	close(start)
	wg.Wait()
}

// Done-when 1: a shared http.Client, 100 goroutines, the API refuses the
// token they all hold → every request ends 200 after at most one retry, and
// the token endpoint is called exactly once, never with a spent token.
func TestTransport401StormOneClient(t *testing.T) {
	b := setup(t, nil)
	src, _ := b.newSource(t, client.WithRuntime("storm-1"))
	hc := httpClient(t, src)
	mustGet200(t, hc, b.api.URL, "warm-up")

	b.api.Retire(b.tok.AccessToken)
	storm(t, b, []*http.Client{hc}, 100)
	b.f.Settled(t)

	if n := b.api.Answered(http.StatusUnauthorized); n == 0 {
		t.Fatal("the API never answered 401: the test did not exercise the retry")
	}
	if n := b.f.AS.Calls(); n != 1 {
		t.Errorf("token-endpoint calls = %d, want exactly 1", n)
	}
	if n := b.f.AS.Reuses(); n != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", n)
	}
}

// Done-when 2: the same across 10 clients on 10 separate NATS connections,
// as 10 runtime processes: the events stream de-duplicates their reports.
func TestTransport401StormTenConnections(t *testing.T) {
	b := setup(t, nil)
	var clients []*http.Client
	for i := range 10 {
		src, _ := b.newSource(t, client.WithRuntime(fmt.Sprintf("storm-%d", i)))
		hc := httpClient(t, src)
		mustGet200(t, hc, b.api.URL, fmt.Sprintf("warm-up-%d", i))
		clients = append(clients, hc)
	}

	b.api.Retire(b.tok.AccessToken)
	storm(t, b, clients, 10)
	b.f.Settled(t)

	if n := b.api.Answered(http.StatusUnauthorized); n == 0 {
		t.Fatal("the API never answered 401: the test did not exercise the retry")
	}
	if n := b.f.AS.Calls(); n != 1 {
		t.Errorf("token-endpoint calls = %d, want exactly 1", n)
	}
	if n := b.f.AS.Reuses(); n != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", n)
	}
	// One report reached the stream; the others' spans say they were dropped.
	fp := events.Fingerprint(b.tok.AccessToken)
	var sent, dropped int
	for _, s := range spans.Ended() {
		if s.Name() != "send auth.401" || attrOf(s, "authbus.fingerprint") != fp {
			continue
		}
		sent++
		if attrOf(s, "authbus.duplicate") == "true" {
			dropped++
		}
	}
	if sent == 0 || sent-dropped != 1 {
		t.Errorf("auth.401 publish spans: %d, %d of them marked authbus.duplicate; want all but one marked", sent, dropped)
	}
}

// Done-when 3: a revoked credential surfaces as *NeedsReauthError, with no
// retry: one API hit, one token-endpoint call, and the next request fails
// at once without reaching the API.
func TestTransportRevokedNeedsReauth(t *testing.T) {
	b := setup(t, nil)
	src, _ := b.newSource(t, client.WithWaitTimeout(15*time.Second))
	hc := httpClient(t, src)
	mustGet200(t, hc, b.api.URL, "warm-up")
	hitsBefore := b.api.Hits()

	b.f.AS.Revoke(b.tok.RefreshToken)
	_, _, err := get(context.Background(), hc, b.api.URL, "revoked")
	var nre *client.NeedsReauthError
	if !errors.As(err, &nre) {
		t.Fatalf("GET after revocation: err = %v; want a *client.NeedsReauthError", err)
	}
	if nre.Reason != "invalid_grant" || nre.Description != "token revoked" || nre.Version != 1 || nre.Key != b.key.String() {
		t.Errorf("NeedsReauthError = %+v; want reason invalid_grant, description \"token revoked\", version 1, key %s", *nre, b.key)
	}
	if strings.Contains(err.Error(), b.tok.AccessToken) || strings.Contains(err.Error(), b.tok.RefreshToken) {
		t.Errorf("the error text holds a token: %v", err)
	}

	_, _, err = get(context.Background(), hc, b.api.URL, "again")
	if !errors.As(err, &nre) {
		t.Fatalf("second GET: err = %v; want a *client.NeedsReauthError", err)
	}
	b.f.Settled(t)
	if n := b.api.Hits() - hitsBefore; n != 1 {
		t.Errorf("API hits after revocation = %d, want 1 (no retry, and no request once re-auth is known)", n)
	}
	if n := b.f.AS.Calls(); n != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", n)
	}
}

// A request whose body cannot be replayed gets its 401 back, but the 401 is
// still reported, so the next request carries a new token.
func TestTransportUnreplayableBody(t *testing.T) {
	b := setup(t, nil)
	src, _ := b.newSource(t)
	hc := httpClient(t, src)
	mustGet200(t, hc, b.api.URL, "warm-up")
	b.api.Retire(b.tok.AccessToken)

	// A plain io.Reader: http.NewRequest cannot set GetBody for it.
	req, _ := http.NewRequest(http.MethodPost, b.api.URL, io.MultiReader(strings.NewReader("payload")))
	req.Header.Set(fleet.RequestIDHeader, "post")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || b.api.HitsFor("post") != 1 {
		t.Fatalf("POST with an unreplayable body: status %d after %d hits; want the 401 itself, no retry", resp.StatusCode, b.api.HitsFor("post"))
	}
	fleet.Eventually(t, 20*time.Second, "a new token after the reported 401", func() bool {
		tok, err := src.Token()
		return err == nil && tok.AccessToken != b.tok.AccessToken
	})
	mustGet200(t, hc, b.api.URL, "after")
	if b.api.HitsFor("after") != 1 {
		t.Errorf("the next request took %d hits; want 1", b.api.HitsFor("after"))
	}
}

// When no new token comes within the wait bound, the request fails with
// ErrTimeout instead of hanging or retrying with the refused token.
func TestTransportWaitBound(t *testing.T) {
	b := setup(t, nil)
	release := make(chan struct{})
	b.f.AS.OnToken(func(*http.Request) { <-release })
	t.Cleanup(func() { close(release) }) // before the pools stop: they wait for the call

	src, _ := b.newSource(t, client.WithWaitTimeout(300*time.Millisecond))
	hc := httpClient(t, src)
	mustGet200(t, hc, b.api.URL, "warm-up")
	b.api.Retire(b.tok.AccessToken)

	_, _, err := get(context.Background(), hc, b.api.URL, "stuck")
	if !errors.Is(err, client.ErrTimeout) {
		t.Fatalf("err = %v; want ErrTimeout", err)
	}
	if n := b.api.HitsFor("stuck"); n != 1 {
		t.Errorf("API hits = %d, want 1", n)
	}

	// The request's own context bounds the wait too, and wins when shorter.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, _, err = get(ctx, hc, b.api.URL, "canceled")
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, client.ErrTimeout) {
		t.Fatalf("err = %v; want the request's context.DeadlineExceeded", err)
	}
}

// The auth.401 event follows the protocol: fingerprint only, runtime,
// status, URL without query or user info, Nats-Msg-Id for de-duplication,
// and the caller's trace context; the producer span has the messaging
// attributes and no token.
func TestTransport401EventAndSpan(t *testing.T) {
	b := setup(t, nil)
	src, _ := b.newSource(t, client.WithRuntime("host-7"))
	hc := httpClient(t, src)
	mustGet200(t, hc, b.api.URL, "warm-up")
	b.api.Retire(b.tok.AccessToken)

	sub, err := b.f.NC.SubscribeSync(b.f.Subj.Event(events.Type401, b.key))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.f.NC.Flush(); err != nil {
		t.Fatal(err)
	}

	ctx, parent := tracerForTest().Start(context.Background(), "caller")
	url := strings.Replace(b.api.URL, "http://", "http://user:pw@", 1) + "/v1/items?api_key=secret#frag"
	status, _, err := get(ctx, hc, url, "traced")
	parent.End()
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET: status %d err %v", status, err)
	}

	msg, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no auth.401 event: %v", err)
	}
	ev, err := events.Decode(events.Type401, b.key, msg.Data)
	if err != nil {
		t.Fatalf("the auth.401 event is malformed: %v", err)
	}
	fp := events.Fingerprint(b.tok.AccessToken)
	u := ev.Unauthorized
	if u.Fingerprint != fp || u.Runtime != "host-7" || u.Status != 401 || u.URL != b.api.URL+"/v1/items" || u.ObservedAt.IsZero() {
		t.Errorf("auth.401 data = %+v; want fingerprint %s, runtime host-7, status 401, url %s/v1/items, observed_at set", *u, fp, b.api.URL)
	}
	if ev.Source != "authbus/client/host-7" {
		t.Errorf("source = %q", ev.Source)
	}
	if got, want := msg.Header.Get(nats.MsgIdHdr), events.MsgID(events.Type401, b.key, fp); got != want {
		t.Errorf("Nats-Msg-Id = %q, want %q", got, want)
	}
	traceID := parent.SpanContext().TraceID().String()
	if tp := msg.Header.Get("traceparent"); !strings.Contains(tp, traceID) {
		t.Errorf("traceparent = %q; want the caller's trace %s", tp, traceID)
	}
	if strings.Contains(string(msg.Data), b.tok.AccessToken) {
		t.Error("the auth.401 event holds the access token")
	}

	span := findSpan(t, traceID, "send auth.401")
	assertProducerSpan(t, span, b.f.Subj.Event(events.Type401, b.key), b.key, fp, b.tok.AccessToken)
}
