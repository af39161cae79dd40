package workers_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

// Done-when 3 of issue 8: the seal key is rotated, the way an operator runs
// `refresher keys rotate`, while 1 000 live credentials are in a 401 storm.
// The reseal and the refreshes contend for the same leases and revisions;
// nothing may be lost to it: no refresh fails, every 401 ends rotated, no
// refresh token is presented twice, and after the old key is retired a
// refresher holding only the new key opens every credential.
func TestRotationUnderStorm(t *testing.T) {
	const creds = 1000
	b := fleet.Setup(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "seal-keys.json")
	oldRing, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	b.Ring = oldRing
	// Each refresh holds its lease for a while, as against a real server:
	// the reseal meets refreshes in flight.
	b.AS.SetLatency(20 * time.Millisecond)
	b.StartPools(t, 2, nil)

	keys := make([]events.Key, creds)
	for i := range keys {
		keys[i] = fleet.MustKey(t, fmt.Sprintf("acme.u%d.api", i))
	}
	registerAll(t, b, keys)
	store, err := kv.OpenStore(ctx, b.JS, b.Subj.CredentialsBucket(), oldRing)
	if err != nil {
		t.Fatal(err)
	}
	if usage, err := store.KeyUsage(ctx); err != nil || !maps.Equal(usage, map[string]int{oldRing.ActiveID(): creds}) {
		t.Fatalf("key usage after registration: %v, %v; want all %d on %s", usage, err, creds, oldRing.ActiveID())
	}
	fps := make([]string, creds)
	for i, k := range keys {
		c, _, err := store.Get(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		fps[i] = c.Fingerprint
	}
	callsBefore := b.AS.Calls()

	// 1. A new active key in the key file. 2. Every refresher restarts
	// with it.
	newID, err := kv.AddKey(path)
	if err != nil {
		t.Fatal(err)
	}
	newRing, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	b.StopPools(t)
	b.Ring = newRing
	b.StartPools(t, 2, nil)
	store, err = kv.OpenStore(ctx, b.JS, b.Subj.CredentialsBucket(), newRing)
	if err != nil {
		t.Fatal(err)
	}
	b.Store = store
	rot := watchRotations(t, b)

	// 3. The reseal, with the storm published while it runs.
	leases, err := kv.OpenLeases(ctx, b.JS, b.Subj.LeasesBucket(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	order := rand.New(rand.NewPCG(8, 3)).Perm(creds) // runtimes do not follow the reseal's order
	resealStart := time.Now()
	var stormErr error
	var published atomic.Int64
	var storm sync.WaitGroup
	storm.Go(func() {
		stormErr = publish401s(ctx, b, keys, fps, order, &published)
	})
	var reps []kv.ResealReport
	for pass := 1; ; pass++ {
		rep, err := store.Reseal(ctx, leases, "keys-rotate-test")
		reps = append(reps, rep)
		if err != nil {
			t.Fatalf("reseal pass %d: %v (report %+v)", pass, err, rep)
		}
		if rep.Busy == 0 {
			break
		}
		if pass == 5 {
			t.Fatalf("%d credentials still busy after %d reseal passes: %+v", rep.Busy, pass, reps)
		}
	}
	resealEnd := time.Now()
	storm.Wait()
	if stormErr != nil {
		t.Fatal(stormErr)
	}
	fleet.Eventually(t, 30*time.Second, "every credential rotated to version 2", func() bool { return rot.count(2) == creds })
	b.Settled(t)
	stormEnd := time.Now()

	during := rot.between(2, resealStart, resealEnd)
	t.Logf("%d credentials, %d 401s published; reseal passes %+v took %v; %d rotations stored while the reseal ran, all %d after %v",
		creds, published.Load(), reps, resealEnd.Sub(resealStart), during, creds, stormEnd.Sub(resealStart))
	if during == 0 {
		t.Error("no refresh completed while the reseal ran: the test did not exercise the race it is about")
	}
	var conflicts, busy int
	for _, r := range reps {
		conflicts += r.Conflicts
		busy += r.Busy
	}
	t.Logf("reseal met %d compare-and-set conflicts and %d busy leases", conflicts, busy)

	// 0 lost, 0 failed: exactly one successful call per credential, no
	// reuse, no needs_reauth anywhere.
	calls, ok, failed := 0, 0, 0
	for _, c := range b.AS.CallLog()[callsBefore:] {
		calls++
		switch {
		case c.Status == 200 && !c.Dropped:
			ok++
		default:
			failed++
		}
	}
	t.Logf("token calls: %d (%d successful, %d failed); reuses %d", calls, ok, failed, b.AS.Reuses())
	if ok != creds || failed != 0 {
		t.Errorf("token calls: %d successful and %d failed for %d credentials; want exactly one successful call each", ok, failed, creds)
	}
	if r := b.AS.Reuses(); r != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", r)
	}
	if n := rot.reauths.Load(); n != 0 {
		t.Errorf("%d auth.needs_reauth events", n)
	}
	if n := len(b.Logs.Records(map[string]string{"outcome": "needs_reauth"})); n != 0 {
		t.Errorf("%d events ended in needs_reauth", n)
	}
	// Every delivery ends rotated or stale, or waits for a lease or for
	// its tenant's turn (one tenant's storm holds all but the workers kept
	// for other tenants): a refresh whose store lost its compare-and-set
	// to the reseal would be "discarded", a redeemed token thrown away.
	outcomes := map[string]int{}
	for _, rec := range b.Logs.Records(map[string]string{"msg": "event processed"}) {
		outcomes[fmt.Sprint(rec["outcome"])]++
	}
	t.Logf("event outcomes: %v", outcomes)
	for o, n := range outcomes {
		if o != "rotated" && o != "stale" && o != "lease_held" && o != "tenant_busy" {
			t.Errorf("%d deliveries ended %s; want only rotated, stale, lease_held or tenant_busy", n, o)
		}
	}
	if outcomes["rotated"] != creds {
		t.Errorf("%d deliveries rotated, want %d", outcomes["rotated"], creds)
	}

	// 4. Retire the old key; only the new one remains in the file.
	usage, err := store.KeyUsage(ctx)
	if err != nil || !maps.Equal(usage, map[string]int{newID: creds}) {
		t.Fatalf("key usage after the reseal: %v, %v; want all %d on %s", usage, err, creds, newID)
	}
	removed, err := kv.RetireKeys(path, usage)
	if err != nil || !slices.Equal(removed, []string{oldRing.ActiveID()}) {
		t.Fatalf("retire: removed %v, %v; want [%s]", removed, err, oldRing.ActiveID())
	}
	onlyNew, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(onlyNew.IDs(), []string{newID}) {
		t.Fatalf("key file after retiring holds %v, want only %s", onlyNew.IDs(), newID)
	}

	// A refresher holding only the new key opens every credential, and
	// what it opens is the refresh token the server considers current.
	b.StopPools(t)
	b.Ring = onlyNew
	b.StartPools(t, 1, nil)
	p := b.Pools[len(b.Pools)-1].Pool
	for i, k := range keys {
		c, _, err := p.Store().Get(ctx, k)
		if err != nil {
			t.Fatalf("a refresher with only key %s cannot read %s: %v", newID, k, err)
		}
		if c.State != kv.StateActive || c.Version != 2 {
			t.Errorf("%s: state %s version %d, want active version 2", k, c.State, c.Version)
		}
		if want := b.AS.CurrentRefreshToken(c.AccessToken.Reveal()); c.RefreshToken.Reveal() != want {
			t.Errorf("%s: the stored refresh token is not the server's current one", k)
		}
		if c.ClientSecret.Reveal() != fleet.ClientSecret {
			t.Errorf("%s: the client secret does not open to what was registered", k)
		}
		fps[i] = c.Fingerprint
	}
	// And it refreshes with it.
	sample := keys[:20]
	if err := publish401s(ctx, b, sample, fps, rand.Perm(len(sample)), &published); err != nil {
		t.Fatal(err)
	}
	fleet.Eventually(t, 30*time.Second, "the new-key-only refresher rotated the sample", func() bool { return rot.count(3) == len(sample) })
	if r := b.AS.Reuses(); r != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", r)
	}
}

// registerAll registers a fresh grant for every key, several at a time.
func registerAll(t *testing.T, b *fleet.Fleet, keys []events.Key) {
	t.Helper()
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(keys) {
					return
				}
				if _, err := b.TryRegister(keys[i], b.AS.Issue(fleet.ClientID), nil); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("register %s: %w", keys[i], err))
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatal(errs[0])
	}
}

// publish401s publishes two 401s for the token fps[i] of each keys[i], in
// the given order: one as the protocol asks (with Nats-Msg-Id), one
// without, as a careless runtime would, so duplicates reach the workers.
func publish401s(ctx context.Context, b *fleet.Fleet, keys []events.Key, fps []string, order []int, published *atomic.Int64) error {
	for _, i := range order {
		for r := range 2 {
			data, err := events.Encode(keys[i], "test/rt", events.Unauthorized{Fingerprint: fps[i], Runtime: fmt.Sprintf("rt-%d", r), Status: 401})
			if err != nil {
				return err
			}
			// The first as a runtime reports it, the second straight into
			// the work queue (the intake would drop it as a duplicate).
			subject, opts := b.Subj.Work(events.Type401, keys[i]), []jetstream.PublishOpt{}
			if r == 0 {
				subject = b.Subj.Event(events.Type401, keys[i])
				opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, keys[i], fps[i])))
			}
			if _, err := b.JS.Publish(ctx, subject, data, opts...); err != nil {
				return fmt.Errorf("publish a 401 for %s: %w", keys[i], err)
			}
			published.Add(1)
		}
	}
	return nil
}

// rotations records when each credential was first announced at each
// version, and counts needs_reauth announcements.
type rotations struct {
	mu      sync.Mutex
	at      map[int64]map[string]time.Time // version → key → first announcement
	reauths atomic.Int64
}

func watchRotations(t *testing.T, b *fleet.Fleet) *rotations {
	t.Helper()
	r := &rotations{at: map[int64]map[string]time.Time{}}
	sub, err := b.NC.Subscribe(b.Subj.EventWildcard(events.TypeRotated), func(m *nats.Msg) {
		now := time.Now()
		_, key, err := b.Subj.ParseEvent(m.Subject)
		if err != nil {
			return
		}
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err != nil {
			t.Errorf("malformed auth.rotated on %s: %v", m.Subject, err)
			return
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		byKey := r.at[ev.Rotated.Version]
		if byKey == nil {
			byKey = map[string]time.Time{}
			r.at[ev.Rotated.Version] = byKey
		}
		if _, seen := byKey[key.String()]; !seen {
			byKey[key.String()] = now
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	reauth, err := b.NC.Subscribe(b.Subj.EventWildcard(events.TypeNeedsReauth), func(*nats.Msg) { r.reauths.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reauth.Unsubscribe() })
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

// count returns how many credentials were announced at version v.
func (r *rotations) count(v int64) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.at[v])
}

// between counts the credentials first announced at version v within
// [from, to].
func (r *rotations) between(v int64, from, to time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, at := range r.at[v] {
		if !at.Before(from) && !at.After(to) {
			n++
		}
	}
	return n
}
