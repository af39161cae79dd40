package workers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// Clustered tests: a real 3-node JetStream cluster inside the test process,
// R3 streams and buckets, pools on connections of their own as separate
// processes would be. Followers are made to lag (natstest.Cluster.Lag),
// leaders are moved and killed.

// clusterFleet is what a clustered pool test needs.
type clusterFleet struct {
	c     *natstest.Cluster
	as    *authtest.Server
	ring  *kv.KeyRing
	logs  *fleet.LogBuffer
	nc    *nats.Conn // the test's own connection (a runtime's view)
	js    jetstream.JetStream
	subj  events.Subjects
	store *kv.Store
	kvb   jetstream.KeyValue // the credential bucket
}

func setupClusterFleet(t *testing.T) *clusterFleet {
	t.Helper()
	c := natstest.RunCluster(t, 3)
	as := authtest.New(t)
	as.AddClient(fleet.ClientID, fleet.ClientSecret)
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": bytes.Repeat([]byte{3}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	f := &clusterFleet{c: c, as: as, ring: ring, logs: &fleet.LogBuffer{}}
	f.subj, _ = events.NewSubjects("")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pool logs:\n%s", f.logs.String())
		}
	})
	return f
}

// clusterConfig is a pool on the cluster: R3, short waits. The lease
// outlives a KV leader election (a renewal waits one out).
func (f *clusterFleet) clusterConfig(name string) workers.Config {
	cfg := workers.Config{
		Replicas: 3, Seal: f.ring, Instance: name,
		MaxDeliver: 200, RetryBase: 50 * time.Millisecond, RetryMax: time.Second, LeaseWait: 100 * time.Millisecond,
		TokenHosts: egress.Policy{AllowLoopback: true},
		Logger:     slog.New(slog.NewJSONHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	faultConfig(&cfg)
	cfg.LeaseTTL = 15 * time.Second
	return cfg
}

// startPool starts a pool on nc, which the caller chose (a node, or the
// whole cluster), and stops it when the test ends.
func (f *clusterFleet) startPool(t *testing.T, nc *nats.Conn, cfg workers.Config) {
	t.Helper()
	var p *workers.Pool
	var err error
	// The first pool creates the R3 streams and buckets; a fresh cluster
	// may still be placing them.
	fleet.Eventually(t, 20*time.Second, "the pool provisions its streams and buckets", func() bool {
		p, err = workers.New(context.Background(), nc, cfg)
		return err == nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("pool %s: %v", cfg.Instance, err)
		}
	})
}

// open binds the test's own connection, store and bucket once a pool has
// created them.
func (f *clusterFleet) open(t *testing.T) {
	t.Helper()
	f.nc = f.c.Connect(t)
	var err error
	if f.js, err = jetstream.New(f.nc); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if f.store, err = kv.OpenStore(ctx, f.js, f.subj.BucketName("CREDENTIALS"), f.ring); err != nil {
		t.Fatal(err)
	}
	if f.kvb, err = f.js.KeyValue(ctx, f.subj.BucketName("CREDENTIALS")); err != nil {
		t.Fatal(err)
	}
}

// register registers n credentials acme.u<i>.api at the test authorization
// server and returns them at version 1.
func (f *clusterFleet) register(t *testing.T, n int) map[events.Key]int64 {
	t.Helper()
	want := map[events.Key]int64{}
	for i := range n {
		key := fleet.MustKey(t, fmt.Sprintf("acme.u%d.api", i))
		f.registerKey(t, key)
		want[key] = 1
	}
	return want
}

func (f *clusterFleet) registerKey(t *testing.T, key events.Key) {
	t.Helper()
	tok := f.as.Issue(fleet.ClientID)
	body, _ := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: f.as.TokenURL(), ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
	})
	fleet.Eventually(t, 20*time.Second, "registration of "+key.String(), func() bool {
		msg, err := f.nc.Request(f.subj.Register(key), body, 2*time.Second)
		return err == nil && msg.Header.Get("Nats-Service-Error-Code") == ""
	})
}

// publish401s publishes n 401s for the current token of key, from n
// runtimes without Nats-Msg-Id, so that every one reaches a pool, and
// retries a publish that found no stream leader as a runtime would.
func (f *clusterFleet) publish401s(t *testing.T, key events.Key, n int) {
	t.Helper()
	ctx := context.Background()
	cur, _, err := f.store.Latest(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	for r := range n {
		data, _ := events.Encode(key, "test/rt", events.Unauthorized{Fingerprint: cur.Fingerprint, Runtime: fmt.Sprintf("rt-%d", r)})
		// Straight into the work queue, without Nats-Msg-Id: each
		// reaches a refresher, as reports outside the duplicate window
		// would (the intake would take in only the first).
		fleet.Eventually(t, 20*time.Second, "publish a 401", func() bool {
			_, err := f.js.Publish(ctx, f.subj.Work(events.Type401, key), data)
			return err == nil
		})
	}
}

func (f *clusterFleet) invariants(t *testing.T) invariants {
	return invariants{
		store: f.store,
		calls: func() []authCall {
			var out []authCall
			for _, c := range f.as.CallLog() {
				out = append(out, authCall{c.Status, c.Dropped})
			}
			return out
		},
		reuse: f.as.Reuses,
		logs:  f.logs,
		vl:    watchVersions(t, f.kvb),
	}
}

// waitVersions waits until every credential is at least at its version in
// want, reading from the leader (a follower may lag on purpose).
func (f *clusterFleet) waitVersions(t *testing.T, want map[events.Key]int64, d time.Duration, what string) {
	t.Helper()
	fleet.Eventually(t, d, what, func() bool {
		for k, v := range want {
			cur, _, err := f.store.Latest(context.Background(), k)
			if err != nil || cur.Version < v {
				return false
			}
		}
		return true
	})
}

// settled waits until the work queue has nothing pending or unacknowledged.
func (f *clusterFleet) settled(t *testing.T) {
	t.Helper()
	fleet.Eventually(t, 60*time.Second, "every event settled", func() bool {
		return fleet.QueueEmpty(f.js, f.subj)
	})
}

func (f *clusterFleet) streams() []string {
	return []string{f.subj.EventsStream(), f.subj.SchedulesStream(), f.subj.ReauthStream(),
		"KV_" + f.subj.BucketName("CREDENTIALS"), "KV_" + f.subj.BucketName("LEASES")}
}

// TestClusterLaggingFollower races two pools on different healthy nodes
// over the same credentials, wave after wave, while the third node, a
// follower of every stream, lags and a runtime keeps re-registering other
// credentials so that the bucket is busy. Every 401 reaches a pool (no
// Nats-Msg-Id), so the two pools contend for each generation, and any
// replica, the lagging one too, may answer a pool's direct get. A fence
// that trusted such a read would present a refresh token the other pool
// had redeemed; node oidc-provider revokes the whole grant for that.
func TestClusterLaggingFollower(t *testing.T) {
	f := setupClusterFleet(t)
	f.as.SetReuse(authtest.ReuseRevokeFamily)
	f.as.SetLatency(2 * time.Millisecond)
	const lagging = 2
	for i := range 2 {
		cfg := f.clusterConfig(fmt.Sprintf("pool-%d", i))
		cfg.Workers = 8
		f.startPool(t, f.c.ConnectTo(t, i), cfg)
	}
	f.open(t)
	// The lagging node must lead nothing: a lagging leader would slow every
	// write and make nothing stale.
	for _, s := range f.streams() {
		if f.c.StreamLeader(s) == lagging {
			f.c.MoveLeader(f.nc, s)
		}
	}
	const creds, waves = 12, 25
	want := f.register(t, creds)
	busy := []events.Key{fleet.MustKey(t, "acme.busy0.api"), fleet.MustKey(t, "acme.busy1.api")}
	for _, k := range busy {
		f.registerKey(t, k)
	}
	inv := f.invariants(t)

	// Keep the bucket busy: re-registrations of other credentials, as
	// runtimes of another user logging in again.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reregistered atomic.Int64
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			tok := f.as.Issue(fleet.ClientID)
			body, _ := json.Marshal(events.RegisterRequest{
				Token:         events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
				TokenEndpoint: f.as.TokenURL(), ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
			})
			if _, err := f.nc.Request(f.subj.Register(busy[i%len(busy)]), body, 2*time.Second); err == nil {
				reregistered.Add(1)
			}
		}
	})
	f.c.Lag(lagging, 30*time.Millisecond)
	for wave := range waves {
		for k := range want {
			f.publish401s(t, k, 3)
			want[k]++
		}
		f.waitVersions(t, want, 60*time.Second, fmt.Sprintf("wave %d rotated every credential", wave))
	}
	close(stop)
	wg.Wait()
	f.c.Lag(lagging, 0)
	f.settled(t)
	inv.check(t, want)
	outcomes := map[string]int{}
	for _, r := range f.logs.Records(map[string]string{"msg": "event processed"}) {
		outcomes[fmt.Sprint(r["outcome"])]++
	}
	t.Logf("%d waves × %d credentials, 3 racing 401s each, one follower lagging 30ms, %d re-registrations meanwhile: %d token calls, %d reuses; outcomes %v",
		waves, creds, reregistered.Load(), f.as.Calls(), f.as.Reuses(), outcomes)
	f.c.WaitCurrent(f.streams()...)
}

// TestFaultClusterLeaderLoss: a 3-node cluster moves the stream leader,
// then the KV leaders, then loses the stream leader, the KV leader and the
// meta leader, each in the middle of a storm, with one follower lagging
// throughout.
func TestFaultClusterLeaderLoss(t *testing.T) {
	f := setupClusterFleet(t)
	for i := range 2 {
		f.startPool(t, f.c.Connect(t), f.clusterConfig(fmt.Sprintf("pool-%d", i)))
	}
	f.open(t)
	const creds = 10
	want := f.register(t, creds)
	inv := f.invariants(t)
	ctx := context.Background()

	// Recovery after a fault: the time until the next rotation is
	// announced, taken from auth.rotated (core NATS, which a leader
	// election does not stop).
	var rotMu sync.Mutex
	var rotatedAt []time.Time // announcements of a version not seen before
	seen := map[string]int64{}
	rsub, err := f.nc.Subscribe(f.subj.EventWildcard(events.TypeRotated), func(m *nats.Msg) {
		_, key, err := f.subj.ParseEvent(m.Subject)
		if err != nil {
			return
		}
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err != nil {
			return
		}
		rotMu.Lock()
		defer rotMu.Unlock()
		if ev.Rotated.Version > seen[key.String()] {
			seen[key.String()] = ev.Rotated.Version
			rotatedAt = append(rotatedAt, time.Now())
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rsub.Unsubscribe() })
	recoveredAfter := func(at time.Time) time.Duration {
		rotMu.Lock()
		defer rotMu.Unlock()
		for _, r := range rotatedAt {
			if r.After(at) {
				return r.Sub(at)
			}
		}
		return -1
	}

	// Each storm: 401s for every credential (one with Nats-Msg-Id, two
	// without); at the first token call the fault strikes, and the storm
	// must still end with exactly one call per credential.
	var calls atomic.Int64
	firstCall := make(chan struct{}, 1)
	f.as.OnToken(func(*http.Request) {
		if calls.Add(1) == 1 {
			firstCall <- struct{}{}
		}
	})
	faults := 0
	stormAnd := func(what string, fault func() (undo func())) {
		t.Helper()
		calls.Store(0)
		for key := range want {
			cur, _, err := f.store.Latest(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := events.Encode(key, "test/rt", events.Unauthorized{Fingerprint: cur.Fingerprint, Runtime: "rt"})
			for r := range 3 {
				// The first as a runtime does (through the intake, with
				// Nats-Msg-Id), two straight into the work queue.
				subject, opts := f.subj.Work(events.Type401, key), []jetstream.PublishOpt{}
				if r == 0 {
					subject = f.subj.Event(events.Type401, key)
					opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, cur.Fingerprint)))
				}
				// A runtime retries a publish that found no stream leader.
				fleet.Eventually(t, 20*time.Second, "publish a 401", func() bool {
					_, err := f.js.Publish(ctx, subject, data, opts...)
					return err == nil
				})
			}
			want[key]++
		}
		select {
		case <-firstCall:
		case <-time.After(45 * time.Second):
			// Generous: a loaded CI machine re-electing after the
			// previous fault; the pools re-pull within seconds.
			t.Fatal("no token call within 45s")
		}
		undo := fault()
		at := time.Now()
		f.waitVersions(t, want, 60*time.Second, "every credential rotated after "+what)
		faults++
		t.Logf("fault %d: %s mid-storm (%d token calls in the storm); next rotation %v after it, all %d credentials rotated after %v",
			faults, what, calls.Load(), recoveredAfter(at).Round(time.Millisecond), len(want), time.Since(at).Round(time.Millisecond))
		undo()
	}
	kill := func(stream func() int) func() func() {
		return func() func() {
			i := stream()
			if i < 0 {
				t.Fatal("no leader to stop")
			}
			f.c.Stop(i)
			return func() {
				f.c.Restart(i)
				f.c.WaitMetaLeader()
			}
		}
	}
	move := func(stream string) func() func() {
		return func() func() {
			f.c.MoveLeader(f.nc, stream)
			return func() {}
		}
	}
	credStream, leaseStream := "KV_"+f.subj.BucketName("CREDENTIALS"), "KV_"+f.subj.BucketName("LEASES")
	// A follower of the credential bucket lags throughout the moves.
	lagging := (f.c.StreamLeader(credStream) + 1) % 3
	f.c.Lag(lagging, 20*time.Millisecond)
	stormAnd("the events stream leader moved", move(f.subj.EventsStream()))
	stormAnd("the KV leaders moved", func() func() {
		move(credStream)()
		return move(leaseStream)()
	})
	f.c.Lag(lagging, 0)
	stormAnd("the events stream leader stopped", kill(func() int { return f.c.StreamLeader(f.subj.EventsStream()) }))
	stormAnd("the KV leader stopped", kill(func() int { return f.c.StreamLeader(credStream) }))
	stormAnd("the JetStream meta leader stopped", kill(f.c.MetaLeader))
	f.as.OnToken(nil)
	f.settled(t)
	inv.check(t, want)
	t.Logf("%d faults; %d token calls for %d rotations, %d reuses", faults, f.as.Calls(), faults*creds, f.as.Reuses())
	if faults < 5 {
		t.Errorf("%d faults, want 5", faults)
	}
	f.c.WaitCurrent(f.streams()...)
}
