package workers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Idle keep-alive connections of the shared HTTP transport end
		// with their server; the runtime may not have reaped them yet.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

const (
	clientID     = "agent-runtime"
	clientSecret = "canary-client-secret-7f3a"
)

// bundle is what a pool test needs: a real NATS server, a real test
// authorization server, and pools started on demand.
type bundle struct {
	srv   *server.Server
	as    *authtest.Server
	nc    *nats.Conn
	js    jetstream.JetStream
	subj  events.Subjects
	ring  *kv.KeyRing
	logs  *syncBuffer
	pools []*poolHandle
	store *kv.Store
}

type poolHandle struct {
	pool *workers.Pool
	nc   *nats.Conn
}

func setup(t testing.TB) *bundle {
	t.Helper()
	srv := natstest.RunServer(t)
	nc, js := natstest.JetStream(t, srv)
	as := authtest.New(t)
	as.AddClient(clientID, clientSecret)
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := events.NewSubjects("")
	return &bundle{srv: srv, as: as, nc: nc, js: js, subj: subj, ring: ring, logs: &syncBuffer{}}
}

// testConfig keeps every wait short so failures show quickly.
func (b *bundle) testConfig() workers.Config {
	return workers.Config{
		Workers:         8,
		TokenTimeout:    5 * time.Second,
		LeaseTTL:        3 * time.Second,
		AckWait:         3 * time.Second,
		MaxDeliver:      200,
		RetryBase:       50 * time.Millisecond,
		RetryMax:        time.Second,
		LeaseWait:       100 * time.Millisecond,
		BreakerOpenFor:  time.Second,
		BreakerFailures: 5,
		Seal:            b.ring,
		Logger:          slog.New(slog.NewJSONHandler(b.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

// startPools starts n pools, each on its own connection as separate
// processes would be, and stops them when the test ends.
func (b *bundle) startPools(t testing.TB, n int, tune func(*workers.Config)) {
	t.Helper()
	for i := range n {
		cfg := b.testConfig()
		cfg.Instance = fmt.Sprintf("pool-%d", len(b.pools)+i)
		if tune != nil {
			tune(&cfg)
		}
		nc := natstest.Connect(t, b.srv)
		p, err := workers.New(context.Background(), nc, cfg)
		if err != nil {
			t.Fatalf("workers.New: %v", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- p.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("pool %s: Run: %v", cfg.Instance, err)
				}
			case <-time.After(15 * time.Second):
				t.Errorf("pool %s did not stop within 15s", cfg.Instance)
			}
		})
		b.pools = append(b.pools, &poolHandle{pool: p, nc: nc})
		b.store = p.Store()
	}
	// Run starts the service asynchronously: wait until it answers.
	probe := b.subj.Token(mustKey(t, "probe.probe.probe"))
	eventually(t, 10*time.Second, "the token service answers", func() bool {
		_, err := b.nc.Request(probe, nil, time.Second)
		return !errors.Is(err, nats.ErrNoResponders)
	})
}

// register registers tokens for key and returns the reply.
func (b *bundle) register(t testing.TB, key events.Key, tok authtest.Tokens, tune func(*events.RegisterRequest)) events.RegisterReply {
	t.Helper()
	reply, err := b.tryRegister(key, tok, tune)
	if err != nil {
		t.Fatalf("register %s: %v", key, err)
	}
	return reply
}

func (b *bundle) tryRegister(key events.Key, tok authtest.Tokens, tune func(*events.RegisterRequest)) (events.RegisterReply, error) {
	req := events.RegisterRequest{
		Token: events.RegisterToken{
			AccessToken: tok.AccessToken, TokenType: tok.TokenType,
			RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn,
		},
		TokenEndpoint: b.as.TokenURL(),
		ClientID:      clientID,
		ClientSecret:  clientSecret,
	}
	if tune != nil {
		tune(&req)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return events.RegisterReply{}, err
	}
	msg, err := b.nc.Request(b.subj.Register(key), body, 5*time.Second)
	if err != nil {
		return events.RegisterReply{}, err
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		return events.RegisterReply{}, fmt.Errorf("%s: %s", code, msg.Data)
	}
	var reply events.RegisterReply
	return reply, json.Unmarshal(msg.Data, &reply)
}

// publish401 publishes a 401 as a runtime following the protocol does:
// through JetStream, with the Nats-Msg-Id that de-duplicates a storm.
func (b *bundle) publish401(t testing.TB, key events.Key, fingerprint, runtime string, withMsgID bool) *jetstream.PubAck {
	t.Helper()
	data, err := events.Encode(key, "test/"+runtime, events.Unauthorized{Fingerprint: fingerprint, Runtime: runtime, Status: 401})
	if err != nil {
		t.Fatal(err)
	}
	var opts []jetstream.PublishOpt
	if withMsgID {
		opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, fingerprint)))
	}
	ack, err := b.js.Publish(context.Background(), b.subj.Event(events.Type401, key), data, opts...)
	if err != nil {
		t.Fatalf("publish 401: %v", err)
	}
	return ack
}

// watcher collects the rotated and needs_reauth events of a key.
type watcher struct {
	mu  sync.Mutex
	evs []*events.Event
	ch  chan struct{}
}

func (b *bundle) watch(t *testing.T, key events.Key) *watcher {
	t.Helper()
	w := &watcher{ch: make(chan struct{}, 1)}
	for _, typ := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
		sub, err := b.nc.Subscribe(b.subj.Event(typ, key), func(m *nats.Msg) {
			ev, err := events.Decode(typ, key, m.Data)
			if err != nil {
				t.Errorf("subscriber got a malformed %s: %v", typ, err)
				return
			}
			w.mu.Lock()
			w.evs = append(w.evs, ev)
			w.mu.Unlock()
			select {
			case w.ch <- struct{}{}:
			default:
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *watcher) events() []*events.Event {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*events.Event(nil), w.evs...)
}

// waitFor waits until match finds an event, or fails the test.
func (w *watcher) waitFor(t *testing.T, what string, match func(*events.Event) bool) *events.Event {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		for _, ev := range w.events() {
			if match(ev) {
				return ev
			}
		}
		select {
		case <-w.ch:
		case <-deadline:
			t.Fatalf("no %s within 20s; saw %d events", what, len(w.events()))
		}
	}
}

func rotatedVersion(v int64) func(*events.Event) bool {
	return func(ev *events.Event) bool { return ev.Rotated != nil && ev.Rotated.Version == v }
}

func (w *watcher) count(match func(*events.Event) bool) int {
	n := 0
	for _, ev := range w.events() {
		if match(ev) {
			n++
		}
	}
	return n
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(d)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("not true within %v: %s", d, what)
		}
	}
}

// settled waits until the work queue holds no pending or unacked events,
// so that counts taken afterwards are final.
func (b *bundle) settled(t *testing.T) {
	t.Helper()
	eventually(t, 30*time.Second, "all events processed", func() bool {
		info, err := b.js.Consumer(context.Background(), b.subj.EventsStream(), "refreshers")
		if err != nil {
			return false
		}
		ci, err := info.Info(context.Background())
		return err == nil && ci.NumPending == 0 && ci.NumAckPending == 0 && ci.NumWaiting >= 0
	})
	// Announcements are published before the ack; a flush round trip on
	// the subscriber's connection delivers what is in flight.
	if err := b.nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func (b *bundle) cred(t *testing.T, key events.Key) *kv.Credential {
	t.Helper()
	c, _, err := b.store.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	return c
}

func mustKey(t testing.TB, s string) events.Key {
	k, err := events.ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// syncBuffer is a bytes.Buffer safe for the pools' concurrent logging.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// logLines returns the JSON log records whose msg and attributes match.
func (s *syncBuffer) records(match map[string]string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(s.String(), "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil {
			continue
		}
		ok := true
		for k, v := range match {
			if fmt.Sprint(rec[k]) != v {
				ok = false
			}
		}
		if ok {
			out = append(out, rec)
		}
	}
	return out
}
