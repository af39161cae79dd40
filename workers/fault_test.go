package workers_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

// Fault tests: real NATS, the real test authorization server, real pools;
// the faults are injected from outside, as they happen in production. After
// every run the same invariants hold (checkInvariants).

// versionLog records the version of every revision written to the
// credential bucket, in order, to prove that no older token ever overwrote
// a newer one.
type versionLog struct {
	mu   sync.Mutex
	seen map[string][]int64
	stop func() // ends the watch; safe to call more than once
}

func watchVersions(t *testing.T, kvb jetstream.KeyValue) *versionLog {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := kvb.WatchAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l := &versionLog{seen: map[string][]int64{}}
	var wg sync.WaitGroup
	wg.Go(func() {
		for e := range w.Updates() {
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var r struct {
				Version int64 `json:"version"`
			}
			if json.Unmarshal(e.Value(), &r) == nil {
				l.mu.Lock()
				l.seen[e.Key()] = append(l.seen[e.Key()], r.Version)
				l.mu.Unlock()
			}
		}
	})
	var once sync.Once
	l.stop = func() {
		once.Do(func() {
			_ = w.Stop()
			cancel()
			wg.Wait()
		})
	}
	t.Cleanup(l.stop)
	return l
}

// monotonic reports a key whose stored version ever went down or repeated.
func (l *versionLog) monotonic() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, vs := range l.seen {
		for i := 1; i < len(vs); i++ {
			if vs[i] <= vs[i-1] {
				return fmt.Errorf("credential %s: stored versions %v: version %d followed %d", k, vs, vs[i], vs[i-1])
			}
		}
	}
	return nil
}

// invariants is what every fault run must leave behind.
type invariants struct {
	store *kv.Store
	calls func() []authCall
	reuse func() int
	logs  *fleet.LogBuffer
	vl    *versionLog
}

// authCall is what the invariants need of one token call.
type authCall struct {
	status  int
	dropped bool
}

// check: every credential is active at want[key]; every generation cost
// exactly one token-endpoint call that the server processed (calls
// abandoned before processing, as by a crash during the call, spend
// nothing); no refresh token was presented twice; no stored version ever
// went backwards; no event ended in needs_reauth.
func (inv invariants) check(t *testing.T, want map[events.Key]int64) {
	t.Helper()
	var rotations int64
	for k, v := range want {
		c, _, err := inv.store.Get(context.Background(), k)
		if err != nil {
			t.Errorf("%s: %v", k, err)
			continue
		}
		if c.State != kv.StateActive || c.Version != v {
			t.Errorf("%s: state %s version %d (%s), want active version %d", k, c.State, c.Version, c.Reason, v)
		}
		rotations += v - 1
	}
	var processed, ok int64
	for _, c := range inv.calls() {
		if c.status != 0 && !c.dropped {
			processed++
		}
		if c.status == http.StatusOK {
			ok++
		}
	}
	if ok != rotations || processed != rotations {
		t.Errorf("token calls: %d processed, %d successful, for %d rotations; want exactly one per generation", processed, ok, rotations)
	}
	if r := inv.reuse(); r != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", r)
	}
	if err := inv.vl.monotonic(); err != nil {
		t.Error(err)
	}
	if n := len(inv.logs.Records(map[string]string{"outcome": "needs_reauth"})); n != 0 {
		t.Errorf("%d events ended in needs_reauth", n)
	}
}

func fleetInvariants(t *testing.T, b *fleet.Fleet) invariants {
	kvb, err := b.JS.KeyValue(context.Background(), b.Subj.BucketName("CREDENTIALS"))
	if err != nil {
		t.Fatal(err)
	}
	return invariants{
		store: b.Store,
		calls: func() []authCall {
			var out []authCall
			for _, c := range b.AS.CallLog() {
				out = append(out, authCall{c.Status, c.Dropped})
			}
			return out
		},
		reuse: b.AS.Reuses,
		logs:  b.Logs,
		vl:    watchVersions(t, kvb),
	}
}

// registerN registers n credentials and returns them at version 1.
func registerN(t *testing.T, b *fleet.Fleet, n int, tune func(*events.RegisterRequest)) map[events.Key]int64 {
	t.Helper()
	want := map[events.Key]int64{}
	for i := range n {
		k := fleet.MustKey(t, fmt.Sprintf("acme.u%d.api", i))
		b.Register(t, k, b.AS.Issue(fleet.ClientID), tune)
		want[k] = 1
	}
	return want
}

// storm publishes 401s for the current token of each key, from several
// runtimes, and raises the version each must reach.
func storm(t *testing.T, b *fleet.Fleet, want map[events.Key]int64, keys []events.Key, runtimes int) {
	t.Helper()
	for _, k := range keys {
		fp := b.Cred(t, k).Fingerprint
		for r := range runtimes {
			// Every other runtime without Nats-Msg-Id: duplicates reach the
			// workers and must end stale.
			b.Publish401(t, k, fp, fmt.Sprintf("rt-%d", r), r%2 == 0)
		}
		want[k]++
	}
}

func waitVersions(t *testing.T, b *fleet.Fleet, want map[events.Key]int64, d time.Duration) {
	t.Helper()
	fleet.Eventually(t, d, "every credential rotated", func() bool {
		for k, v := range want {
			c, _, err := b.Store.Get(context.Background(), k)
			if err != nil || c.Version < v {
				return false
			}
		}
		return true
	})
	b.Settled(t)
}

// retryPublish publishes until the stream or a refresher's intake takes the
// message, for up to 30s, as a runtime retries a report that got no answer
// (every refresher dead, no stream leader).
func retryPublish(ctx context.Context, js jetstream.JetStream, subject string, data []byte, opts ...jetstream.PublishOpt) error {
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := js.Publish(pctx, subject, data, opts...)
		cancel()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		<-tick.C
	}
}

// faultConfig keeps every recovery short: a dead holder's lease expires
// within about 2s, its unacked event comes back after 1s, an open breaker
// half-opens after 500ms.
func faultConfig(c *workers.Config) {
	c.Workers = 4
	c.TokenTimeout = 500 * time.Millisecond
	c.LeaseTTL = 2 * time.Second
	c.AckWait = time.Second
	c.BreakerFailures = 3
	c.BreakerOpenFor = 500 * time.Millisecond
}

// ---------------------------------------------------------------------------
// (a) Workers killed at random points of the refresh, hundreds of times.

// Kill points. Each is a point where a crash costs nothing but time: the
// lease expires by itself and the event comes back. A crash after the
// server has answered and before the answer is stored is not among them:
// it spends the refresh token, the documented cost of a lost answer.
const (
	killAtClaim = "after the lease is claimed, before the call"
	killInCall  = "during the token call, before the server processed it"
	killStored  = "after the new token is stored"
)

// proc is one single-worker pool seen as a process: a kill closes its NATS
// connection without releasing anything and aborts its token call, as a
// crash does. One worker per process keeps a kill to one refresh: with
// more, a kill would also cut off another credential's answered call.
type proc struct {
	name   string
	ctx    context.Context
	kill   context.CancelFunc
	handle *fleet.PoolHandle // nil until StartPools returns
}

// killer owns the processes of one fleet, decides at each kill point,
// with its seeded random source, whether to kill there, and counts.
type killer struct {
	t      *testing.T
	b      *fleet.Fleet
	base   *http.Transport
	target int // kills to fire; no more once reached
	// sink receives the token calls of processes to be killed in the
	// call: it kills the caller once the whole request has arrived and
	// never answers, the authorization server never seeing the call. A
	// kill timed against the server's own processing would race it on a
	// loaded machine, and a call processed but unanswered spends its
	// refresh token.
	sink *httptest.Server

	mu     sync.Mutex
	rng    *rand.Rand
	p      map[string]float64 // chance of a kill at each point
	procs  []*proc
	fired  map[string]int
	total  int
	starts int
	dead   chan struct{} // signalled on every kill
	wg     sync.WaitGroup
}

func newKiller(t *testing.T, b *fleet.Fleet, seed uint64, target int) *killer {
	k := &killer{
		t: t, b: b, base: &http.Transport{MaxIdleConnsPerHost: 32}, target: target,
		rng:   rand.New(rand.NewPCG(seed, 42)),
		p:     map[string]float64{killAtClaim: 0.25, killInCall: 0.25, killStored: 0.3},
		fired: map[string]int{}, dead: make(chan struct{}, 1),
	}
	k.sink = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		k.mu.Lock()
		var victim *proc
		for _, p := range k.procs {
			if p.name == r.Header.Get(procHeader) {
				victim = p
			}
		}
		k.mu.Unlock()
		if victim == nil || !k.kill(victim, killInCall) {
			http.Error(w, "not killed", http.StatusServiceUnavailable)
			return
		}
		<-r.Context().Done() // the dead process's connection closes
	}))
	t.Cleanup(func() {
		k.sink.CloseClientConnections()
		k.sink.Close()
		k.wg.Wait()
		k.base.CloseIdleConnections()
	})
	return k
}

// procHeader names the calling process in calls sent to the sink.
const procHeader = "X-Test-Process"

// killConfig is faultConfig for single-worker processes that are killed
// over and over: an event may meet many dead holders' leases before it is
// refreshed, so it is delivered far more often than production allows.
func killConfig(c *workers.Config) {
	faultConfig(c)
	c.Workers = 1
	c.MaxDeliver = 10000
	c.LeaseWait = 250 * time.Millisecond
}

// start starts processes until n are alive.
func (k *killer) start(n int) {
	k.t.Helper()
	missing := n - k.alive()
	if missing <= 0 {
		return
	}
	first := len(k.b.Pools)
	store := k.b.Store
	k.b.StartPools(k.t, missing, func(c *workers.Config) {
		killConfig(c)
		p := &proc{name: c.Instance}
		p.ctx, p.kill = context.WithCancel(context.Background())
		c.HTTPClient = &http.Client{Transport: killTransport{k: k, p: p}}
		k.mu.Lock()
		k.procs = append(k.procs, p)
		k.starts++
		k.mu.Unlock()
	})
	k.mu.Lock()
	for i := first; i < len(k.b.Pools); i++ {
		k.procs[i].handle = k.b.Pools[i]
	}
	k.mu.Unlock()
	if store != nil {
		// StartPools points the fleet at the last pool's store, whose
		// connection a kill may close.
		k.b.Store = store
	}
}

// roll draws whether to kill at point; kill counts the kills that happen.
func (k *killer) roll(point string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.total < k.target && k.rng.Float64() < k.p[point]
}

// kill kills p, once, if it is running, and reports whether it did.
func (k *killer) kill(p *proc, point string) bool {
	k.mu.Lock()
	if p.handle == nil || p.ctx.Err() != nil || k.total >= k.target {
		k.mu.Unlock()
		return false
	}
	k.fired[point]++
	k.total++
	h := p.handle
	k.mu.Unlock()
	// The connection first: once it is closed nothing more reaches NATS,
	// as after a crash. Aborting the token call first would let the pool
	// release its lease.
	h.NC.Close()
	p.kill()
	k.wg.Go(func() { h.Stop(k.t) }) // Run ends on the closed connection
	select {
	case k.dead <- struct{}{}:
	default:
	}
	return true
}

// killHolder kills the process holding key's lease.
func (k *killer) killHolder(ctx context.Context, leases jetstream.KeyValue, key string, point string) {
	e, err := leases.Get(ctx, key)
	if err != nil {
		return // released already: the refresh is over
	}
	k.mu.Lock()
	var victim *proc
	for _, p := range k.procs {
		if p.name == string(e.Value()) {
			victim = p
		}
	}
	k.mu.Unlock()
	if victim != nil {
		k.kill(victim, point)
	}
}

func (k *killer) alive() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, p := range k.procs {
		if p.ctx.Err() == nil {
			n++
		}
	}
	return n
}

func (k *killer) enough() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.total >= k.target
}

// killTransport runs a process's token calls under its life, and is where
// the process is killed at the claim and in the call.
type killTransport struct {
	k *killer
	p *proc
}

func (t killTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.p.ctx.Err() != nil {
		return nil, errors.New("process killed")
	}
	if t.k.roll(killAtClaim) && t.k.kill(t.p, killAtClaim) {
		return nil, errors.New("process killed")
	}
	ctx, cancel := context.WithCancel(r.Context())
	stop := context.AfterFunc(t.p.ctx, cancel)
	r = r.Clone(ctx) // a RoundTripper must not modify the caller's request
	if t.k.roll(killInCall) {
		r.URL.Host = t.k.sink.Listener.Addr().String()
		r.Header.Set(procHeader, t.p.name)
	}
	resp, err := t.k.base.RoundTrip(r)
	if err != nil {
		stop()
		cancel()
		return nil, err
	}
	resp.Body = bodyCloser{resp.Body, func() { stop(); cancel() }}
	return resp, nil
}

type bodyCloser struct {
	io.ReadCloser
	done func()
}

func (b bodyCloser) Close() error {
	err := b.ReadCloser.Close()
	b.done()
	return err
}

// watchKV calls f for every put on a bucket until the test ends.
func watchKV(t *testing.T, kvb jetstream.KeyValue, f func(jetstream.KeyValueEntry)) {
	ctx, cancel := context.WithCancel(context.Background())
	w, err := kvb.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for e := range w.Updates() {
			if e != nil && e.Operation() == jetstream.KeyValuePut {
				f(e)
			}
		}
	})
	t.Cleanup(func() {
		_ = w.Stop()
		cancel()
		wg.Wait()
	})
}

// stored tracks the newest stored version of every credential, from a
// watch of the bucket, and wakes waiters on every change.
type stored struct {
	mu      sync.Mutex
	version map[string]int64
	changed chan struct{}
}

func (s *stored) set(key string, v int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if v > s.version[key] {
		s.version[key] = v
		close(s.changed)
		s.changed = make(chan struct{})
	}
}

// wait waits until key is stored at version v or later.
func (s *stored) wait(key string, v int64, d time.Duration) error {
	deadline := time.After(d)
	for {
		s.mu.Lock()
		got, ch := s.version[key], s.changed
		s.mu.Unlock()
		if got >= v {
			return nil
		}
		select {
		case <-ch:
		case <-deadline:
			return fmt.Errorf("%s not at version %d within %v (stored: %d)", key, v, d, got)
		}
	}
}

// killRun is what one seed's run counted.
type killRun struct {
	kills     map[string]int
	total     int
	starts    int
	rotations int64
	calls     int // token calls that reached the server
	reuses    int
	took      time.Duration
}

// TestFaultKilledWorkers kills single-worker processes at random points of
// their refreshes, some 200 times over three fixed seeds, while lanes of
// 401 storms keep every credential refreshing; dead processes are replaced
// as they die. After each seed the invariants hold: every generation cost
// exactly one processed token call, no refresh token was presented twice,
// no stored version went backwards, nothing ended in needs_reauth.
func TestFaultKilledWorkers(t *testing.T) {
	const minKills = 200
	seeds := []uint64{1, 2, 3}
	perSeed := (minKills + len(seeds) - 1) / len(seeds)
	var sum killRun
	sum.kills = map[string]int{}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			r := runKills(t, seed, perSeed)
			t.Logf("seed %d: %d kills %v; %d processes started; %d rotations, %d token calls reached the server, %d reuses, in %v",
				seed, r.total, r.kills, r.starts, r.rotations, r.calls, r.reuses, r.took.Round(time.Millisecond))
			for p, n := range r.kills {
				sum.kills[p] += n
			}
			sum.total += r.total
			sum.starts += r.starts
			sum.rotations += r.rotations
			sum.calls += r.calls
			sum.reuses += r.reuses
			sum.took += r.took
		})
	}
	t.Logf("all seeds: %d kills %v; %d processes started; %d rotations, %d token calls reached the server, %d reuses, in %v",
		sum.total, sum.kills, sum.starts, sum.rotations, sum.calls, sum.reuses, sum.took.Round(time.Millisecond))
	if !t.Failed() && sum.total < minKills {
		t.Errorf("%d kills fired, want at least %d", sum.total, minKills)
	}
	for _, p := range []string{killAtClaim, killInCall, killStored} {
		if !t.Failed() && sum.kills[p] == 0 {
			t.Errorf("no kill %s: that point was not exercised", p)
		}
	}
}

func runKills(t *testing.T, seed uint64, target int) killRun {
	const (
		procs = 12 // alive at any time
		lanes = 24 // credentials refreshed concurrently, one generation at a time
	)
	start := time.Now()
	b := fleet.Setup(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pool logs:\n%s", b.Logs.String())
		}
	})
	b.AS.SetLatency(50 * time.Millisecond)
	k := newKiller(t, b, seed, target)
	k.start(procs)
	store, err := kv.OpenStore(context.Background(), b.JS, b.Subj.BucketName("CREDENTIALS"), b.Ring)
	if err != nil {
		t.Fatal(err)
	}
	b.Store = store
	inv := fleetInvariants(t, b)
	ctx := context.Background()
	leases, err := b.JS.KeyValue(ctx, b.Subj.BucketName("LEASES"))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := b.JS.KeyValue(ctx, b.Subj.BucketName("CREDENTIALS"))
	if err != nil {
		t.Fatal(err)
	}
	st := &stored{version: map[string]int64{}, changed: make(chan struct{})}
	watchKV(t, creds, func(e jetstream.KeyValueEntry) {
		var r struct {
			Version int64 `json:"version"`
		}
		if json.Unmarshal(e.Value(), &r) != nil {
			return
		}
		// The holder still has the lease while it announces, schedules
		// and acks. The kill comes before the lane learns of the store:
		// once it has, the credential's next refresh may hold the lease,
		// and killing that one in its call could lose its answer.
		if r.Version > 1 && k.roll(killStored) {
			k.killHolder(ctx, leases, e.Key(), killStored)
		}
		st.set(e.Key(), r.Version)
	})

	want := registerN(t, b, lanes, nil)
	keys := sortedKeys(want)
	errs := make(chan error, lanes)
	var wg sync.WaitGroup
	for i, key := range keys {
		wg.Go(func() {
			for !k.enough() {
				c, _, err := store.Get(ctx, key)
				if err != nil {
					errs <- err
					return
				}
				for r := range 3 {
					// The first as a runtime reports (through a refresher's
					// intake, with Nats-Msg-Id, retried while every
					// refresher is dead, as a runtime would); the others
					// straight into the work queue, as reports outside the
					// duplicate window: they reach the workers and must
					// end stale.
					data, _ := events.Encode(key, "test/rt", events.Unauthorized{Fingerprint: c.Fingerprint, Runtime: fmt.Sprintf("rt-%d-%d", i, r)})
					subject, opts := b.Subj.Work(events.Type401, key), []jetstream.PublishOpt{}
					if r == 0 {
						subject = b.Subj.Event(events.Type401, key)
						opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, c.Fingerprint)))
					}
					if err := retryPublish(ctx, b.JS, subject, data, opts...); err != nil {
						errs <- fmt.Errorf("publish a 401 for %s: %w", key, err)
						return
					}
				}
				if err := st.wait(key.String(), c.Version+1, 60*time.Second); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	lanesDone := make(chan struct{})
	go func() {
		wg.Wait()
		close(lanesDone)
	}()
	// Replace the dead as they die.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for running := true; running; {
		select {
		case <-lanesDone:
			running = false
		case <-k.dead:
		case <-tick.C:
		}
		if running {
			k.start(procs)
		}
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return killRun{}
	}
	k.start(procs)
	for _, key := range keys {
		c, _, err := store.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		want[key] = c.Version
	}
	b.Settled(t)
	inv.check(t, want)

	k.mu.Lock()
	defer k.mu.Unlock()
	r := killRun{kills: maps.Clone(k.fired), total: k.total, starts: k.starts, reuses: b.AS.Reuses(), took: time.Since(start)}
	for _, v := range want {
		r.rotations += v - 1
	}
	r.calls = b.AS.Calls()
	return r
}

func sortedKeys(m map[events.Key]int64) []events.Key {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b events.Key) int { return cmp.Compare(a.String(), b.String()) })
	return keys
}

// ---------------------------------------------------------------------------
// (b) The token endpoint down for a while.

// front stands before the test authorization server and fails as a real
// endpoint does: connections refused, requests that hang, 503s.
type front struct {
	t      *testing.T
	addr   string
	srv    *http.Server
	proxy  *httputil.ReverseProxy
	mu     sync.Mutex
	mode   string
	ln     net.Listener
	conns  map[net.Conn]bool
	serves sync.WaitGroup
	calls  sync.WaitGroup // handlers, which Close does not wait for
	done   chan struct{}  // closed at the end of the test, ends hangs
}

func newFront(t *testing.T, target string) *front {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	f := &front{t: t, mode: "ok", conns: map[net.Conn]bool{}, proxy: httputil.NewSingleHostReverseProxy(u), done: make(chan struct{})}
	f.proxy.Transport = &http.Transport{}
	f.srv = &http.Server{
		Handler: http.HandlerFunc(f.serve),
		ConnState: func(c net.Conn, s http.ConnState) {
			f.mu.Lock()
			defer f.mu.Unlock()
			if s == http.StateClosed || s == http.StateHijacked {
				delete(f.conns, c)
			} else {
				f.conns[c] = true
			}
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	f.listen(ln)
	t.Cleanup(func() {
		close(f.done)
		_ = f.srv.Close()
		f.serves.Wait()
		f.calls.Wait()
		f.proxy.Transport.(*http.Transport).CloseIdleConnections()
	})
	return f
}

func (f *front) listen(ln net.Listener) {
	f.ln = ln
	f.serves.Go(func() { _ = f.srv.Serve(ln) })
}

func (f *front) URL() string { return "http://" + f.addr + "/token" }

func (f *front) serve(w http.ResponseWriter, r *http.Request) {
	f.calls.Add(1)
	defer f.calls.Done()
	f.mu.Lock()
	mode := f.mode
	f.mu.Unlock()
	switch mode {
	case "503":
		http.Error(w, "upstream unavailable", http.StatusServiceUnavailable)
	case "hang":
		select { // the client's timeout ends it
		case <-r.Context().Done():
		case <-f.done:
		}
	default:
		f.proxy.ServeHTTP(w, r)
	}
}

// set switches the failure mode; "refused" closes the listener and every
// open connection, "ok" listens again on the same port.
func (f *front) set(mode string) {
	f.t.Helper()
	f.mu.Lock()
	old := f.mode
	f.mode = mode
	var conns []net.Conn
	if mode == "refused" {
		for c := range f.conns {
			conns = append(conns, c)
		}
	}
	f.mu.Unlock()
	switch {
	case mode == "refused" && old != "refused":
		f.ln.Close()
		for _, c := range conns {
			c.Close()
		}
	case mode != "refused" && old == "refused":
		ln, err := net.Listen("tcp", f.addr)
		if err != nil {
			f.t.Fatalf("front: listen again on %s: %v", f.addr, err)
		}
		f.listen(ln)
	}
}

// countingTransport counts every token call the pools attempt, refused
// connections included.
type countingTransport struct {
	base *http.Transport
	n    atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.base.RoundTrip(r)
}

func TestFaultTokenEndpointDown(t *testing.T) {
	for _, mode := range []string{"refused", "hang", "503"} {
		t.Run(mode, func(t *testing.T) {
			b := fleet.Setup(t)
			f := newFront(t, b.AS.BaseURL())
			ct := &countingTransport{base: &http.Transport{MaxIdleConnsPerHost: 8}}
			t.Cleanup(ct.base.CloseIdleConnections)
			const pools, creds = 2, 10
			b.StartPools(t, pools, func(c *workers.Config) {
				faultConfig(c)
				c.HTTPClient = &http.Client{Transport: ct}
			})
			inv := fleetInvariants(t, b)
			want := registerN(t, b, creds, func(r *events.RegisterRequest) { r.TokenEndpoint = f.URL() })
			keys := sortedKeys(want)

			f.set(mode)
			storm(t, b, want, keys, 2)
			// Down "for a while": until the breakers have opened and their
			// half-open probes have failed again, twice over.
			opened := func() int {
				return len(b.Logs.Records(map[string]string{"msg": "token endpoint breaker changed state", "to": "open"}))
			}
			fleet.Eventually(t, 20*time.Second, "breakers opened and re-opened after failed probes", func() bool { return opened() >= 3 })
			attempts := ct.n.Load()
			halfOpen := int64(len(b.Logs.Records(map[string]string{"msg": "token endpoint breaker changed state", "to": "half-open"})))
			// Before a breaker trips, each worker may have a call in flight;
			// after that, one probe per half-open.
			if bound := int64(pools*4) + int64(pools)*int64(3) + halfOpen; attempts > bound {
				t.Errorf("%d token calls attempted while down (%d half-open probes), want at most %d: the breaker does not bound them", attempts, halfOpen, bound)
			}
			t.Logf("%s: %d calls attempted while down for %d events; %d breaker opens, %d half-open probes", mode, attempts, creds*2, opened(), halfOpen)
			if got := b.AS.Calls(); got != 0 {
				t.Errorf("%d calls reached the authorization server while it was down", got)
			}

			f.set("ok")
			waitVersions(t, b, want, 30*time.Second)
			inv.check(t, want)
		})
	}
}

// ---------------------------------------------------------------------------
// (c) The NATS server restarts under a running refresher.

func TestFaultNATSRestart(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 2, func(c *workers.Config) {
		faultConfig(c)
		// The token call spans the restart below; its answer must not be
		// given up on (the server would redeem the refresh token anyway).
		c.TokenTimeout, c.LeaseTTL = 10*time.Second, 0
	})
	inv := fleetInvariants(t, b)
	want := registerN(t, b, 3, nil)
	keys := sortedKeys(want)
	storm(t, b, want, keys, 2)
	waitVersions(t, b, want, 20*time.Second)

	connected := func() bool {
		if !b.NC.IsConnected() {
			return false
		}
		for _, p := range b.Pools {
			if !p.NC.IsConnected() {
				return false
			}
		}
		return true
	}
	// Between refreshes, then during one: the server goes away while the
	// token call is in flight, and is back before its answer arrives.
	start := time.Now()
	b.Srv = natstest.Restart(t, b.Srv)
	fleet.Eventually(t, 20*time.Second, "every connection is back", connected)
	t.Logf("restart 1: connections back after %v", time.Since(start))
	storm(t, b, want, keys[:1], 2)
	waitVersions(t, b, want, 20*time.Second)
	t.Logf("restart 1: rotated after %v", time.Since(start))

	var once sync.Once
	inCall, restarted := make(chan struct{}), make(chan struct{})
	release := sync.OnceFunc(func() { close(restarted) })
	t.Cleanup(release) // a failed test must not leave the server's handler blocked
	b.AS.OnToken(func(*http.Request) {
		once.Do(func() {
			close(inCall)
			<-restarted
		})
	})
	storm(t, b, want, keys[1:], 2)
	select {
	case <-inCall:
	case <-time.After(20 * time.Second):
		t.Fatal("no token call within 20s")
	}
	start = time.Now()
	b.Srv = natstest.Restart(t, b.Srv)
	release()
	fleet.Eventually(t, 20*time.Second, "every connection is back", connected)
	t.Logf("restart 2: connections back after %v", time.Since(start))
	waitVersions(t, b, want, 30*time.Second)
	t.Logf("restart 2: rotated after %v", time.Since(start))
	b.AS.OnToken(nil)
	before := inv.vl
	inv.vl = watchVersionsAgain(t, b, before)
	inv.check(t, want)
	// Stop the pools and the watch while the restarted server is still up:
	// its cleanup, registered last, runs first.
	b.StopPools(t)
	before.stop()
}

// watchVersionsAgain keeps the versions seen before a restart (the
// watcher's consumer lived on the old server) and checks the history as the
// restarted server holds it.
func watchVersionsAgain(t *testing.T, b *fleet.Fleet, before *versionLog) *versionLog {
	t.Helper()
	kvb, err := b.JS.KeyValue(context.Background(), b.Subj.BucketName("CREDENTIALS"))
	if err != nil {
		t.Fatal(err)
	}
	after := &versionLog{seen: map[string][]int64{}}
	before.mu.Lock()
	for k, vs := range before.seen {
		after.seen[k] = slices.Clone(vs)
	}
	before.mu.Unlock()
	ctx := context.Background()
	for k := range maps.Clone(after.seen) {
		hist, err := kvb.History(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		var vs []int64
		for _, e := range hist {
			var r struct {
				Version int64 `json:"version"`
			}
			if json.Unmarshal(e.Value(), &r) == nil {
				vs = append(vs, r.Version)
			}
		}
		after.seen[k+" (history)"] = vs
	}
	return after
}
