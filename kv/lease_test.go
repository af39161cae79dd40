package kv

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var leaseKey = events.Key{Tenant: "acme", User: "alice", Server: "github"}

func (b *testBundle) claim(t testing.TB, holder string) *Lease {
	t.Helper()
	l, err := b.leases.Claim(b.ctx, leaseKey, holder, Read{})
	if err != nil {
		t.Fatalf("Claim by %s: %v", holder, err)
	}
	// Every lease renews itself until released, lost or not.
	t.Cleanup(func() { _ = l.Release(context.Background()) })
	return l
}

// orphan stops the lease's renewals without releasing it, as a holder
// that crashed: the lease then expires by itself.
func (l *Lease) orphan() {
	l.stopOnce.Do(func() { close(l.stop) })
	l.kept.Wait()
}

func (b *testBundle) assertHolder(t testing.TB, want string) {
	t.Helper()
	holder, held, err := b.leases.Holder(b.ctx, leaseKey)
	if err != nil || held != (want != "") || holder != want {
		t.Fatalf("Holder = %q, %v, %v; want %q", holder, held, err, want)
	}
}

// waitExpired polls until the lease key is gone by itself: the server
// removes it about 1-2 s after its TTL.
func (b *testBundle) waitExpired(t testing.TB) {
	t.Helper()
	eventually(t, b.leases.TTL()+3*time.Second, "lease expires", func() bool {
		_, held, err := b.leases.Holder(b.ctx, leaseKey)
		return err == nil && !held
	})
}

func TestClaim(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.assertHolder(t, "")
	l := b.claim(t, "w1")
	if l.Key() != leaseKey || l.Revision() == 0 || !l.Trusted(time.Now()) {
		t.Fatalf("lease key %v rev %d trusted %v", l.Key(), l.Revision(), l.Trusted(time.Now()))
	}
	b.assertHolder(t, "w1")

	_, err := b.leases.Claim(b.ctx, leaseKey, "w2", Read{})
	if !errors.Is(err, ErrLeaseHeld) || !strings.Contains(err.Error(), leaseKey.String()) || !strings.Contains(err.Error(), `"w1"`) {
		t.Fatalf("second Claim: %v, want ErrLeaseHeld naming the key and the holder", err)
	}
	b.assertHolder(t, "w1")

	// Leases of other credentials are independent.
	other := events.Key{Tenant: "acme", User: "bob", Server: "github"}
	if l2, err := b.leases.Claim(b.ctx, other, "w2", Read{}); err != nil {
		t.Fatalf("Claim of another key: %v", err)
	} else {
		defer l2.Release(b.ctx)
	}

	if _, err := b.leases.Claim(b.ctx, leaseKey, "", Read{}); err == nil {
		t.Fatal("Claim with an empty holder succeeded")
	}
	if _, err := b.leases.Claim(b.ctx, events.Key{Tenant: "a.b", User: "c", Server: "d"}, "w1", Read{}); !errors.Is(err, events.ErrInvalidKey) {
		t.Fatalf("Claim of an invalid key: %v", err)
	}
}

func TestReleaseThenReclaim(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.claim(t, "w1")
	if err := l.Release(b.ctx); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := l.Release(b.ctx); err != nil {
		t.Fatalf("second Release: %v, want nil (idempotent)", err)
	}
	if l.Trusted(time.Now()) || !l.TrustedUntil().IsZero() {
		t.Fatal("a released lease is still trusted")
	}
	if err := l.renew(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew after Release: %v, want ErrLeaseLost", err)
	}
	b.assertHolder(t, "")

	l2 := b.claim(t, "w2")
	b.assertHolder(t, "w2")
	if l2.Revision() <= l.Revision() {
		t.Fatalf("new lease revision %d not after old %d", l2.Revision(), l.Revision())
	}
	if err := l2.Release(b.ctx); err != nil {
		t.Fatal(err)
	}

	// Release's marker expires, leaving the bucket empty, so a later claim
	// is a single publish (after kv.Delete it would be three requests:
	// see BenchmarkClaimRelease).
	eventually(t, 3*time.Second, "release marker expires", func() bool {
		st, err := b.leases.kv.Status(b.ctx)
		return err == nil && st.Values() == 0
	})
	before := b.nc.Stats().OutMsgs
	b.claim(t, "w3")
	if n := b.nc.Stats().OutMsgs - before; n != 1 {
		t.Errorf("Claim after the release marker expired sent %d messages, want 1", n)
	}
	b.assertHolder(t, "w3")
}

func TestReleaseAfterTakeover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l1 := b.claim(t, "w1")
	l1.orphan()
	b.waitExpired(t)
	l2 := b.claim(t, "w2")

	if err := l1.Release(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Release of a lease taken over: %v, want ErrLeaseLost", err)
	}
	if err := l1.Release(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("second Release of a lost lease: %v, want ErrLeaseLost", err)
	}
	b.assertHolder(t, "w2") // untouched
	if err := l2.renew(b.ctx); err != nil {
		t.Fatalf("new holder's Renew: %v", err)
	}
	if err := l2.Release(b.ctx); err != nil {
		t.Fatalf("new holder's Release: %v", err)
	}
	b.assertHolder(t, "")
}

func TestReleaseAfterExpiry(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.claim(t, "w1")
	l.orphan()
	b.waitExpired(t)
	if err := l.Release(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Release of an expired lease: %v, want ErrLeaseLost", err)
	}
	// The expiry marker does not block a new claim.
	b.claim(t, "w2")
}

func TestLeaseKeepsItselfAlive(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// 3s rather than the usual 2s: renewing must survive a loaded test
	// machine stalling the renewer for a second or two.
	leases, err := NewLeases(b.ctx, b.js, LeaseConfig{Bucket: b.leases.kv.Bucket(), TTL: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	l, err := leases.Claim(b.ctx, leaseKey, "w1", Read{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release(b.ctx)
	first := l.Revision()
	stop := time.Now().Add(leases.TTL() + 2*time.Second) // well past the original expiry
	eventually(t, time.Until(stop)+time.Second, "run past the original TTL", func() bool {
		select {
		case <-l.Done():
			t.Fatal("the lease ended while it renews itself")
		default:
		}
		if !l.Trusted(time.Now()) {
			t.Fatal("not trusted while it renews itself")
		}
		b.assertHolder(t, "w1")
		return time.Now().After(stop)
	})
	if l.Revision() == first {
		t.Fatal("revision unchanged: the lease did not renew")
	}
	if _, err := b.leases.Claim(b.ctx, leaseKey, "w2", Read{}); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("Claim of a renewed lease: %v, want ErrLeaseHeld", err)
	}
	// A renewal keeps the TTL: once renewing stops (as when its holder
	// crashes), the lease still expires, and Done reports the loss.
	l.orphan()
	eventually(t, leases.TTL()+3*time.Second, "renewed lease expires", func() bool {
		_, held, err := b.leases.Holder(b.ctx, leaseKey)
		return err == nil && !held
	})
	if err := l.Release(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Release of the expired lease: %v, want ErrLeaseLost", err)
	}
	select {
	case <-l.Done():
	default:
		t.Fatal("Done not closed after the lease was lost")
	}
	if !l.Lost() {
		t.Fatal("Lost is false after the lease was lost")
	}
}

// TestLeaseDoneOnTakeover checks that a lease another holder took over
// notices by itself and closes Done.
func TestLeaseDoneOnTakeover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.claim(t, "w1")
	// Another holder takes the key over, as after an expiry the holder did
	// not see (a long stall).
	if err := b.leases.kv.Delete(b.ctx, leaseKey.String()); err != nil {
		t.Fatal(err)
	}
	other := b.claim(t, "w2")
	defer other.Release(b.ctx)
	select {
	case <-l.Done():
	case <-time.After(liveness):
		t.Fatalf("Done not closed within %v of a takeover", liveness)
	}
	if !l.Lost() || l.Trusted(time.Now()) {
		t.Fatal("a lease taken over is not lost, or still trusted")
	}
	b.assertHolder(t, "w2")
}

func TestRenewAfterTakeover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l1 := b.claim(t, "w1")
	l1.orphan()
	b.waitExpired(t)
	l2 := b.claim(t, "w2")

	if err := l1.renew(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew of a lease taken over: %v, want ErrLeaseLost", err)
	}
	if l1.Trusted(time.Now()) {
		t.Fatal("lost lease still trusted")
	}
	if err := l1.renew(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("second Renew: %v, want ErrLeaseLost (stays lost)", err)
	}
	if err := l1.Release(b.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Release of a lost lease: %v, want ErrLeaseLost", err)
	}
	b.assertHolder(t, "w2")
	if !l2.Trusted(time.Now()) {
		t.Fatal("new holder's lease not trusted")
	}
}

func TestLeaseExpiresByItself(t *testing.T) {
	t.Parallel()
	b := setup(t)
	start := time.Now()
	b.claim(t, "crashed").orphan()
	b.waitExpired(t)
	if took := time.Since(start); took < b.leases.TTL() {
		t.Fatalf("lease gone after %v, before its TTL %v", took, b.leases.TTL())
	}
	b.claim(t, "w2")
	b.assertHolder(t, "w2")
}

func TestTrusted(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		ttl, trusted time.Duration
	}{
		{2 * time.Second, time.Second},               // margin 1s: the floor
		{10 * time.Second, 9 * time.Second},          // TTL/10 = 1s
		{30 * time.Second, 27 * time.Second},         // TTL/10 = 3s
		{65 * time.Second, 58500 * time.Millisecond}, // TTL/10 = 6.5s
	} {
		start := time.Now()
		l := &Lease{leases: &Leases{ttl: tc.ttl}, start: start}
		if got := l.TrustedUntil().Sub(start); got != tc.trusted {
			t.Errorf("TTL %v: trusted for %v, want %v", tc.ttl, got, tc.trusted)
		}
		if !l.Trusted(start) || !l.Trusted(start.Add(tc.trusted-time.Nanosecond)) || l.Trusted(start.Add(tc.trusted)) {
			t.Errorf("TTL %v: Trusted is wrong around its deadline", tc.ttl)
		}
		l.state = leaseLost
		if l.Trusted(start) {
			t.Errorf("TTL %v: lost lease trusted", tc.ttl)
		}
	}
}

func TestNewLeases(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.claim(t, "w1")
	again, err := NewLeases(b.ctx, b.js, LeaseConfig{Bucket: b.leases.kv.Bucket(), TTL: 2500 * time.Millisecond})
	if err != nil {
		t.Fatalf("second NewLeases: %v", err)
	}
	if again.TTL() != 3*time.Second {
		t.Fatalf("TTL 2.5s rounds to %v, want 3s", again.TTL())
	}
	if _, err := again.Claim(b.ctx, leaseKey, "w2", Read{}); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("Claim through the second Leases: %v, want ErrLeaseHeld", err)
	}
	if err := l.Release(b.ctx); err != nil {
		t.Fatal(err)
	}
	st, err := again.kv.Status(b.ctx)
	if err != nil || st.History() != 1 || st.LimitMarkerTTL() != leaseMarkerTTL {
		t.Fatalf("lease bucket history %d marker TTL %v (%v); want 1 and %v", st.History(), st.LimitMarkerTTL(), err, leaseMarkerTTL)
	}

	_, err = NewLeases(b.ctx, b.js, LeaseConfig{TTL: time.Second, Replicas: -1})
	for _, want := range []string{"Bucket is empty", "TTL is 1s", "Replicas is -1"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("NewLeases with a bad config: %v; want it to say %q", err, want)
		}
	}
}

func TestAPIPrefix(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		opts jetstream.JetStreamOptions
		want string
	}{
		{jetstream.JetStreamOptions{}, "$JS.API."},
		{jetstream.JetStreamOptions{Domain: "hub"}, "$JS.hub.API."},
		{jetstream.JetStreamOptions{APIPrefix: "acme.js"}, "acme.js."},
		{jetstream.JetStreamOptions{APIPrefix: "acme.js."}, "acme.js."},
	} {
		if got := apiPrefix(tc.opts); got != tc.want {
			t.Errorf("apiPrefix(%+v) = %q, want %q", tc.opts, got, tc.want)
		}
	}
}

// TestClaimProves checks what a claim proves about a read of the record
// made before it (claimProves), for every state the lease key can be in.
func TestClaimProves(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.leases.subPrefix + leaseKey.String()
	mark := func(t *testing.T, h nats.Header) {
		t.Helper()
		// A marker without a TTL, so that it is still there when the
		// claim comes however slow the machine.
		m := nats.NewMsg(subject)
		m.Header = h
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
		if _, err := b.js.PublishMsg(b.ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	claimed := func(t *testing.T, read Read) *Lease {
		t.Helper()
		l, err := b.leases.Claim(b.ctx, leaseKey, "w2", read)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = l.Release(b.ctx) })
		return l
	}
	if _, err := b.store.Create(b.ctx, testCredential(t, leaseKey.String())); err != nil {
		t.Fatal(err)
	}

	t.Run("key without messages", func(t *testing.T) {
		_, read, err := b.store.Load(b.ctx, leaseKey)
		if err != nil {
			t.Fatal(err)
		}
		if !read.single {
			t.Fatal("a read on the standalone test server is not marked as answered by the only copy")
		}
		if l := claimed(t, read); !l.current {
			t.Error("a claim that found the key empty does not prove a read made just before it")
		}
		old := read
		old.at = old.at.Add(-leaseMarkerTTL)
		if b.leases.claimProves(old, time.Now(), 0) {
			t.Error("it proves a read made a marker TTL earlier: a lease may have ended after that read")
		}
		replica := read
		replica.single = false
		if b.leases.claimProves(replica, time.Now(), 0) {
			t.Error("it proves a read that a replica may have answered")
		}
		if b.leases.claimProves(Read{at: time.Now(), single: true}, time.Now(), 0) {
			t.Error("it proves a read of nothing")
		}
	})
	t.Run("release stating a revision", func(t *testing.T) {
		h := nats.Header{}
		h.Set(kvOperationHeader, "PURGE")
		h.Set(leftRevisionHeader, "7")
		mark(t, h)
		old := time.Now().Add(-time.Hour) // no time is involved
		if l := claimed(t, Read{Revision: 7, at: old}); !l.current {
			t.Error("a read at the stated revision 7 is not proven current")
		}
		if !b.leases.claimProves(Read{Revision: 8, at: old}, time.Time{}, 7) {
			t.Error("a read after the stated revision 7 is not proven current")
		}
		if b.leases.claimProves(Read{Revision: 6, at: old, single: true}, time.Time{}, 7) {
			t.Error("a read older than the stated revision 7 is proven current")
		}
	})
	for _, tc := range []struct {
		name, header, value string
	}{
		{"release stating nothing", kvOperationHeader, "PURGE"},
		{"delete marker", kvOperationHeader, "DEL"},
		{"expiry marker", markerReasonHeader, "MaxAge"},
		{"unparsable revision", leftRevisionHeader, "seven"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := nats.Header{}
			h.Set(kvOperationHeader, "PURGE")
			h.Set(tc.header, tc.value)
			mark(t, h)
			if l := claimed(t, Read{Revision: 1 << 60, at: time.Now(), single: true}); l.current {
				t.Errorf("a claim over a %s proves a read current", tc.name)
			}
		})
	}
}

// TestReleaseStatesWhatItLeaves checks the marker Release writes: the
// revision Leaves recorded, none after Leaves(0) or without Leaves.
func TestReleaseStatesWhatItLeaves(t *testing.T) {
	t.Parallel()
	b := setup(t)
	// The marker lives a second; a subscription sees it however late the
	// test looks.
	sub, err := b.nc.SubscribeSync(b.leases.subPrefix + leaseKey.String())
	if err != nil {
		t.Fatal(err)
	}
	released := func(t *testing.T, leaves ...uint64) nats.Header {
		t.Helper()
		l := b.claim(t, "w1")
		for _, rev := range leaves {
			l.leaves(rev)
		}
		if err := l.Release(b.ctx); err != nil {
			t.Fatalf("Release: %v", err)
		}
		for {
			m, err := sub.NextMsg(5 * time.Second)
			if err != nil {
				t.Fatalf("no marker seen: %v", err)
			}
			if isMarker(m.Header) {
				return m.Header
			}
		}
	}
	if h := released(t, 42); h.Get(leftRevisionHeader) != "42" || h.Get(kvOperationHeader) != "PURGE" {
		t.Errorf("marker after Leaves(42): %v, want PURGE stating 42", h)
	}
	if h := released(t, 42, 0); h.Get(leftRevisionHeader) != "" {
		t.Errorf("marker after Leaves(0): %v, want no revision", h)
	}
	if h := released(t); h.Get(leftRevisionHeader) != "" {
		t.Errorf("marker without Leaves: %v, want no revision", h)
	}
}

// TestClaimProvesReplicated checks that in a cluster a claim of an empty
// key proves nothing: reads there are direct gets a lagging follower may
// answer, and markers may be expired on another clock, while a stated
// revision still proves a read at or after it.
func TestClaimProvesReplicated(t *testing.T) {
	t.Parallel()
	js, store, leases := setupReplicated(t)
	ctx := context.Background()
	if _, err := store.Create(ctx, testCredential(t, leaseKey.String())); err != nil {
		t.Fatal(err)
	}
	_, read, err := store.Load(ctx, leaseKey)
	if err != nil {
		t.Fatal(err)
	}
	if read.single {
		t.Error("a read in a cluster is marked as answered by the only copy")
	}
	l, err := leases.Claim(ctx, leaseKey, "w1", read)
	if err != nil {
		t.Fatalf("Claim: %v", err)
	}
	defer l.Release(ctx)
	if l.current {
		t.Error("a claim of an empty key in a cluster proves a read")
	}
	read.single = true // even a read that claimed to be: the lease bucket is replicated
	if leases.claimProves(read, time.Now(), 0) {
		t.Error("a claim of an empty key on a replicated lease bucket proves a read")
	}
	// A release marker stating 7, without a TTL so that it is still there
	// however slow the machine.
	other := events.Key{Tenant: "acme", User: "bob", Server: "github"}
	m := nats.NewMsg(leases.subPrefix + other.String())
	m.Header.Set(kvOperationHeader, "PURGE")
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	m.Header.Set(leftRevisionHeader, "7")
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	l2, err := leases.Claim(ctx, other, "w2", Read{Revision: 7})
	if err != nil {
		t.Fatalf("Claim over the marker: %v", err)
	}
	defer l2.Release(ctx)
	if !l2.current || leases.claimProves(Read{Revision: 6}, time.Time{}, 7) {
		t.Error("a claim over a marker stating 7 in a cluster does not prove exactly reads at 7 or later")
	}
}

// setupReplicated starts a 3-node cluster with R3 credential and lease
// buckets.
func setupReplicated(t *testing.T) (jetstream.JetStream, *Store, *Leases) {
	t.Helper()
	c := natstest.RunCluster(t, 3)
	c.WaitMetaLeader()
	js, err := jetstream.New(c.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	name := bucketName(t)
	var store *Store
	var leases *Leases
	ring := testRing(t)
	// A fresh cluster may not place replicated streams at once.
	eventually(t, 20*time.Second, "buckets created", func() bool {
		var err1, err2 error
		store, err1 = NewStore(t.Context(), js, StoreConfig{Bucket: "cred_" + name, Replicas: 3}, ring)
		leases, err2 = NewLeases(t.Context(), js, LeaseConfig{Bucket: "lease_" + name, TTL: testLeaseTTL, Replicas: 3})
		return err1 == nil && err2 == nil
	})
	// Created is not yet led, nor known to every server: a write until
	// then finds no stream to answer it.
	c.WaitCurrent(BucketStream("cred_"+name), BucketStream("lease_"+name))
	for _, bucket := range []string{"cred_" + name, "lease_" + name} {
		eventually(t, 20*time.Second, bucket+" takes writes", func() bool {
			_, err := js.Publish(t.Context(), "$KV."+bucket+".probe", nil)
			return err == nil
		})
	}
	return js, store, leases
}

// TestClusterMarkers checks the markers of a clustered deployment: a
// release leaves one that lives clusterMarkerTTL and states the revision
// stored under the lease (nothing when nothing was stored), a claim over
// it writes once (the peek found it), and a write without the lease
// restates it, so that a read older than that write proves nothing.
func TestClusterMarkers(t *testing.T) {
	t.Parallel()
	js, store, leases := setupReplicated(t)
	ctx := t.Context()
	c := testCredential(t, leaseKey.String())
	rev, err := store.Create(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	marker := func() *jetstream.RawStreamMsg {
		t.Helper()
		msg, err := leaderGet(ctx, js.Conn(), apiPrefix(js.Options()), BucketStream(leases.kv.Bucket()), leases.subPrefix+leaseKey.String(), true)
		if err != nil || !isMarker(msg.Header) {
			t.Fatalf("the lease key's last message: %v %v, want a marker", msg, err)
		}
		return msg
	}

	// A holder that stored nothing states nothing, whatever it read.
	l, err := leases.Claim(ctx, leaseKey, "w1", Read{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.Fence(ctx, l, c); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if m := marker(); m.Header.Get(leftRevisionHeader) != "" || m.Header.Get(jetstream.MsgTTLHeader) != clusterMarkerTTL.String() {
		t.Errorf("marker of a holder that stored nothing: %v, want no revision and TTL %v", m.Header, clusterMarkerTTL)
	}

	// A holder that stored states what it stored; the next claim finds
	// the marker with its peek, writes once, and proves a read of that
	// revision.
	store1 := func(holder string, read Read, c *Credential, rev uint64) (*Lease, uint64) {
		t.Helper()
		l, err := leases.Claim(ctx, leaseKey, holder, read)
		if err != nil {
			t.Fatal(err)
		}
		n := c.Clone()
		n.Version++
		stored, err := store.UpdateUnder(ctx, l, n, rev)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if got := marker().Header.Get(leftRevisionHeader); got != fmt.Sprint(stored) {
			t.Errorf("marker after storing revision %d states %q", stored, got)
		}
		return l, stored
	}
	_, stored := store1("w1", Read{}, c, rev)
	before := js.Conn().Stats().OutMsgs
	l2, stored2 := store1("w2", Read{Revision: stored}, c, stored)
	if !l2.current {
		t.Error("a read of the stored revision is not proven by the claim over its marker")
	}
	// The peek, one write to claim (not a failed write, a leader read and
	// a write), the store, the release, and this test's read of the marker.
	if sent := js.Conn().Stats().OutMsgs - before; sent != 5 {
		t.Errorf("a claim over a marker, a store and a release sent %d messages, want 5", sent)
	}

	// A registration writes without the lease: the marker is restated, and
	// a read of the revision before it (a lagging follower's) proves
	// nothing.
	registered, err := store.Update(ctx, c, stored2)
	if err != nil {
		t.Fatal(err)
	}
	if err := leases.WroteWithout(ctx, leaseKey, registered); err != nil {
		t.Fatalf("WroteWithout: %v", err)
	}
	if got := marker().Header.Get(leftRevisionHeader); got != fmt.Sprint(registered) {
		t.Errorf("marker after a write without the lease at %d states %q", registered, got)
	}
	l, err = leases.Claim(ctx, leaseKey, "w3", Read{Revision: stored2})
	if err != nil {
		t.Fatal(err)
	}
	if l.current {
		t.Error("a read from before a registration is proven current by the claim after it")
	}
	// A held lease is never a claim's starting point, however current the
	// peek that shows it.
	eventually(t, 10*time.Second, "a direct get shows the lease held", func() bool {
		msg, err := leases.stream.GetLastMsgForSubject(ctx, leases.subPrefix+leaseKey.String())
		return err == nil && !isMarker(msg.Header)
	})
	if l2, err := leases.Claim(ctx, leaseKey, "w4", Read{Revision: registered}); !errors.Is(err, ErrLeaseHeld) {
		t.Errorf("a second Claim of a held lease = %v, %v; want ErrLeaseHeld", l2, err)
	}
	// A held lease is left alone.
	if err := leases.WroteWithout(ctx, leaseKey, registered+1); err != nil {
		t.Fatalf("WroteWithout on a held lease: %v", err)
	}
	if err := l.renew(ctx); err != nil {
		t.Errorf("the lease after WroteWithout: %v, want it still held", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseGivesUpAfterMaxHold checks that a lease its holder never
// releases stops keeping itself alive after maxHoldTTLs TTLs, so that a
// stuck holder cannot block the credential for the life of the process.
func TestLeaseGivesUpAfterMaxHold(t *testing.T) {
	t.Parallel()
	b := setup(t)
	start := time.Now()
	l := b.claim(t, "stuck")
	select {
	case <-l.Done():
	case <-time.After(maxHoldTTLs*b.leases.TTL() + liveness):
		t.Fatalf("the lease still lives %v after its claim", time.Since(start))
	}
	if held := time.Since(start); held < maxHoldTTLs*b.leases.TTL() {
		t.Fatalf("the lease ended after %v, before its %d TTLs", held, maxHoldTTLs)
	}
	if !l.Lost() {
		t.Fatal("Done closed but the lease is not lost")
	}
}
