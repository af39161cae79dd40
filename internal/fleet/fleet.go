// Package fleet runs a whole authbus installation inside a test: a real
// embedded NATS server with JetStream, a real test authorization server, and
// refresher pools started on demand, each on its own connection as separate
// processes would be. Every package that tests against a running refresher
// (workers, the client library, the CLIs, telemetry) uses it, so they all
// exercise the same set-up.
package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// The OAuth client every fleet registers at its test authorization server.
const (
	ClientID     = "agent-runtime"
	ClientSecret = "canary-client-secret-7f3a"
)

// Fleet is what a pool test needs: a real NATS server, a real test
// authorization server, and pools started on demand.
type Fleet struct {
	Srv   *server.Server      // the embedded NATS server
	AS    *authtest.Server    // the token endpoint
	NC    *nats.Conn          // the test's own connection (a runtime's view)
	JS    jetstream.JetStream // JetStream on NC
	Subj  events.Subjects     // the default "auth" subjects
	Ring  *kv.KeyRing         // the seal keys every pool shares
	Logs  *LogBuffer          // every pool's JSON log output
	Pools []*PoolHandle       // the pools started so far
	Store *kv.Store           // the credential store of the last pool started
}

// PoolHandle is one running pool and its own connection.
type PoolHandle struct {
	Pool *workers.Pool
	NC   *nats.Conn

	name    string
	cancel  context.CancelFunc
	done    chan error
	stopped sync.Once
}

// Stop stops the pool gracefully, as SIGTERM stops a refresher, and waits
// for Run to return. It is safe to call more than once.
func (h *PoolHandle) Stop(t testing.TB) {
	t.Helper()
	h.stopped.Do(func() {
		h.cancel()
		select {
		case err := <-h.done:
			if err != nil {
				t.Errorf("pool %s: Run: %v", h.name, err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("pool %s did not stop within 15s", h.name)
		}
	})
}

// StopPools stops every pool started so far; StartPools starts new ones.
func (b *Fleet) StopPools(t testing.TB) {
	t.Helper()
	for _, h := range b.Pools {
		h.Stop(t)
	}
}

// Setup starts a NATS server and a test authorization server that knows
// ClientID; pools start with StartPools.
func Setup(t testing.TB) *Fleet {
	t.Helper()
	srv := natstest.RunServer(t)
	nc, js := natstest.JetStream(t, srv)
	as := authtest.New(t)
	as.AddClient(ClientID, ClientSecret)
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := events.NewSubjects("")
	return &Fleet{Srv: srv, AS: as, NC: nc, JS: js, Subj: subj, Ring: ring, Logs: &LogBuffer{}}
}

// TestConfig keeps every wait short so failures show quickly.
func (b *Fleet) TestConfig() workers.Config {
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
		Seal:            b.Ring,
		TokenHosts:      egress.Policy{AllowLoopback: true}, // the test AS listens on 127.0.0.1
		Logger:          slog.New(slog.NewJSONHandler(b.Logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

// StartPools starts n pools, each on its own connection as separate
// processes would be, and stops them when the test ends.
func (b *Fleet) StartPools(t testing.TB, n int, tune func(*workers.Config)) {
	t.Helper()
	for range n {
		cfg := b.TestConfig()
		cfg.Instance = fmt.Sprintf("pool-%d", len(b.Pools))
		if tune != nil {
			tune(&cfg)
		}
		nc := natstest.Connect(t, b.Srv)
		p, err := workers.New(context.Background(), nc, cfg)
		if err != nil {
			t.Fatalf("workers.New: %v", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		h := &PoolHandle{Pool: p, NC: nc, cancel: cancel, done: make(chan error, 1), name: cfg.Instance}
		go func() { h.done <- p.Run(ctx) }()
		t.Cleanup(func() { h.Stop(t) })
		b.Pools = append(b.Pools, h)
		b.Store = p.Store()
	}
	// Run starts the service asynchronously: wait until it answers.
	probe := b.Subj.Token(MustKey(t, "probe.probe.probe"))
	Eventually(t, 10*time.Second, "the token service answers", func() bool {
		_, err := b.NC.Request(probe, nil, time.Second)
		return !errors.Is(err, nats.ErrNoResponders)
	})
}

// Register registers tokens for key and returns the reply.
func (b *Fleet) Register(t testing.TB, key events.Key, tok authtest.Tokens, tune func(*events.RegisterRequest)) events.RegisterReply {
	t.Helper()
	reply, err := b.TryRegister(key, tok, tune)
	if err != nil {
		t.Fatalf("register %s: %v", key, err)
	}
	return reply
}

// TryRegister is Register that returns the error instead of failing the test.
func (b *Fleet) TryRegister(key events.Key, tok authtest.Tokens, tune func(*events.RegisterRequest)) (events.RegisterReply, error) {
	req := events.RegisterRequest{
		Token: events.RegisterToken{
			AccessToken: tok.AccessToken, TokenType: tok.TokenType,
			RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn,
		},
		TokenEndpoint: b.AS.TokenURL(),
		ClientID:      ClientID,
		ClientSecret:  ClientSecret,
	}
	if tune != nil {
		tune(&req)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return events.RegisterReply{}, err
	}
	var msg *nats.Msg
	for attempt := 1; ; attempt++ {
		if msg, err = b.NC.Request(b.Subj.Register(key), body, 5*time.Second); err != nil {
			return events.RegisterReply{}, err
		}
		// 503: the refresher that answered serves as many of this
		// tenant's requests as it may; the protocol says retry shortly.
		if msg.Header.Get("Nats-Service-Error-Code") != "503" || attempt == 50 {
			break
		}
		<-time.After(time.Duration(10+rand.IntN(40)) * time.Millisecond)
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		return events.RegisterReply{}, fmt.Errorf("%s: %s", code, msg.Data)
	}
	var reply events.RegisterReply
	return reply, json.Unmarshal(msg.Data, &reply)
}

// Publish401 publishes a 401. With withMsgID it is a runtime following the
// protocol: a JetStream publish on the key's auth.401 subject, with the
// Nats-Msg-Id that de-duplicates a storm, taken in by a refresher's intake.
// Without, it is a report the de-duplication does not catch (one outside
// the duplicate window): written straight into the work queue, as only
// refreshers may, so that it reaches a worker whatever was reported before.
func (b *Fleet) Publish401(t testing.TB, key events.Key, fingerprint, runtime string, withMsgID bool) *jetstream.PubAck {
	t.Helper()
	data, err := events.Encode(key, "test/"+runtime, events.Unauthorized{Fingerprint: fingerprint, Runtime: runtime, Status: 401})
	if err != nil {
		t.Fatal(err)
	}
	subject := b.Subj.Work(events.Type401, key)
	var opts []jetstream.PublishOpt
	if withMsgID {
		subject = b.Subj.Event(events.Type401, key)
		opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, fingerprint)))
	}
	ack, err := b.JS.Publish(context.Background(), subject, data, opts...)
	if err != nil {
		t.Fatalf("publish 401: %v", err)
	}
	return ack
}

// Watcher collects the rotated and needs_reauth events of a key.
type Watcher struct {
	mu  sync.Mutex
	evs []*events.Event
	ch  chan struct{}
}

// Watch subscribes to the rotated and needs_reauth events of key.
func (b *Fleet) Watch(t testing.TB, key events.Key) *Watcher {
	t.Helper()
	w := &Watcher{ch: make(chan struct{}, 1)}
	for _, typ := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
		sub, err := b.NC.Subscribe(b.Subj.Event(typ, key), func(m *nats.Msg) {
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
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

// Events returns what the watcher has seen so far.
func (w *Watcher) Events() []*events.Event {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*events.Event(nil), w.evs...)
}

// WaitFor waits until match finds an event, or fails the test.
func (w *Watcher) WaitFor(t testing.TB, what string, match func(*events.Event) bool) *events.Event {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		for _, ev := range w.Events() {
			if match(ev) {
				return ev
			}
		}
		select {
		case <-w.ch:
		case <-deadline:
			t.Fatalf("no %s within 20s; saw %d events", what, len(w.Events()))
		}
	}
}

// RotatedVersion matches the auth.rotated event of version v.
func RotatedVersion(v int64) func(*events.Event) bool {
	return func(ev *events.Event) bool { return ev.Rotated != nil && ev.Rotated.Version == v }
}

// Count returns how many events match.
func (w *Watcher) Count(match func(*events.Event) bool) int {
	n := 0
	for _, ev := range w.Events() {
		if match(ev) {
			n++
		}
	}
	return n
}

// Eventually polls cond until it holds or the deadline passes.
func Eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
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

// Settled waits until the work queue holds no pending or unacked events,
// so that counts taken afterwards are final.
func (b *Fleet) Settled(t testing.TB) {
	t.Helper()
	Eventually(t, 30*time.Second, "all events processed", func() bool {
		return QueueEmpty(b.JS, b.Subj)
	})
	// Announcements are published before the ack; a flush round trip on
	// the subscriber's connection delivers what is in flight.
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
}

// QueueEmpty reports whether the refreshers' lanes (the consumers
// "refreshers" and "refreshers-slow" of the events stream, and
// "refreshers-due" of the schedules stream) hold no pending or unacked
// event.
func QueueEmpty(js jetstream.JetStream, subj events.Subjects) bool {
	for _, lane := range [][2]string{{subj.EventsStream(), "refreshers"}, {subj.EventsStream(), "refreshers-slow"}, {subj.SchedulesStream(), "refreshers-due"}} {
		c, err := js.Consumer(context.Background(), lane[0], lane[1])
		if err != nil {
			return false
		}
		ci, err := c.Info(context.Background())
		if err != nil || ci.NumPending != 0 || ci.NumAckPending != 0 {
			return false
		}
	}
	return true
}

// Cred returns the stored credential of key.
func (b *Fleet) Cred(t testing.TB, key events.Key) *kv.Credential {
	t.Helper()
	c, _, err := b.Store.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	return c
}

// LastFailure returns the failed refresh of key's generation in force that
// status would show, or nil: read as an operator reads it (kv.Inspector).
func (b *Fleet) LastFailure(t testing.TB, key events.Key) *kv.Failure {
	t.Helper()
	in, err := kv.OpenInspector(context.Background(), b.JS, b.Subj)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := in.Inspect(context.Background(), key.String())
	if err != nil || len(infos) != 1 {
		t.Fatalf("inspect %s: %d credentials, %v", key, len(infos), err)
	}
	return infos[0].LastFailure
}

// MustKey parses a credential key or fails the test.
func MustKey(t testing.TB, s string) events.Key {
	k, err := events.ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// LogBuffer is a bytes.Buffer safe for the pools' concurrent logging.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (s *LogBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

// String returns everything written so far.
func (s *LogBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// Records returns the JSON log records whose msg and attributes match.
func (s *LogBuffer) Records(match map[string]string) []map[string]any {
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

// Request sends a bare-JSON request and returns the reply's error code
// header (empty on success) and body.
func (b *Fleet) Request(t testing.TB, subject string, body []byte) (code string, reply []byte) {
	t.Helper()
	msg, err := b.NC.Request(subject, body, 5*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return msg.Header.Get("Nats-Service-Error-Code"), msg.Data
}
