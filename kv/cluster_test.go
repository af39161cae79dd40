package kv

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/internal/natstest"
)

// clusterBundle is a 3-node cluster with R3 credential and lease buckets,
// one node, a follower of both, that can be made to lag, and a store and
// leases through each of the two others. The lagging node serves no
// client: a client of a healthy node meets it all the same, since any
// replica may answer a direct get.
type clusterBundle struct {
	c       *natstest.Cluster
	lagging int    // a follower of both buckets' streams
	near    *Store // through the credential stream's leader
	nearL   *Leases
	far     *Store // through the third node
	farL    *Leases
	farJS   jetstream.JetStream
	name    string // of the buckets, after their prefix
}

func setupCluster(t *testing.T) *clusterBundle {
	t.Helper()
	ctx := context.Background()
	c := natstest.RunCluster(t, 3)
	name := bucketName(t)
	ring := testRing(t)
	open := func(js jetstream.JetStream) (s *Store, l *Leases) {
		t.Helper()
		// A fresh cluster may still be placing the buckets.
		eventually(t, 20*time.Second, "buckets opened", func() bool {
			var err1, err2 error
			s, err1 = NewStore(ctx, js, StoreConfig{Bucket: "cred_" + name, Replicas: 3}, ring)
			l, err2 = NewLeases(ctx, js, LeaseConfig{Bucket: "lease_" + name, TTL: 10 * time.Second, Replicas: 3})
			return err1 == nil && err2 == nil
		})
		return s, l
	}
	js, err := jetstream.New(c.Connect(t))
	if err != nil {
		t.Fatal(err)
	}
	b := &clusterBundle{c: c, name: name}
	open(js) // creates the buckets
	// The lagging node leads neither bucket: a lagging leader would wait
	// for its followers' late acknowledgements on every write, which slows
	// everything down and makes nothing stale.
	leader, leaseLeader := c.StreamLeader("KV_cred_"+name), c.StreamLeader("KV_lease_"+name)
	if leader < 0 || leaseLeader < 0 {
		t.Fatal("a bucket has no leader")
	}
	b.lagging = 3 - leader - leaseLeader
	if leader == leaseLeader {
		b.lagging = (leader + 1) % 3
	}
	third := 3 - leader - b.lagging
	nearJS, err := jetstream.New(c.ConnectTo(t, leader))
	if err != nil {
		t.Fatal(err)
	}
	b.farJS, err = jetstream.New(c.ConnectTo(t, third))
	if err != nil {
		t.Fatal(err)
	}
	b.near, b.nearL = open(nearJS)
	b.far, b.farL = open(b.farJS)
	t.Cleanup(func() {
		c.Lag(b.lagging, 0)
		c.WaitCurrent("KV_cred_"+name, "KV_lease_"+name)
	})
	return b
}

// leaseNow describes, for a failure, how long l was held and its key's
// last message as the lease bucket's leader holds it now.
func (b *clusterBundle) leaseNow(ctx context.Context, l *Lease, since time.Time) string {
	l.mu.Lock()
	rev := l.rev
	l.mu.Unlock()
	msg, err := leaderGet(ctx, b.farJS.Conn(), jetstream.DefaultAPIPrefix, b.farL.stream.CachedInfo().Config.Name, b.farL.subPrefix+l.key.String(), true)
	if err != nil {
		return fmt.Sprintf("held %v at revision %d; the key's last message: %v", time.Since(since), rev, err)
	}
	return fmt.Sprintf("held %v at revision %d; the key's last message: sequence %d, headers %v, data %q",
		time.Since(since), rev, msg.Sequence, msg.Header, msg.Data)
}

// TestFenceWithLaggingFollower is the contested claim that lost refresh
// tokens on replicated deployments, repeated: refresher A reads, claims,
// rotates (stores revision r+1) and releases; refresher B, on another
// healthy node, had read revision r, and claims right after A's release.
// One follower lags; a direct get of B's (what a read fence made of kv.Get
// would see) that it answers is still at r. Fence must never be, or B
// would present the refresh token A redeemed. One round in ten B
// claims after A's release marker is gone, so the claim finds the key
// empty and proves nothing by itself.
func TestFenceWithLaggingFollower(t *testing.T) {
	t.Parallel()
	b := setupCluster(t)
	ctx := context.Background()

	const keys, rounds = 10, 100 // 1 000 contested claims
	// Every replica has every record before the follower starts to lag: a
	// record a replica never had answers "not found", which is stale too
	// but not the staleness this test counts.
	creds, created := make([]*Credential, keys), make([]uint64, keys)
	for i := range keys {
		creds[i] = testCredential(t, fmt.Sprintf("acme.u%d.github", i))
		var err error
		if created[i], err = b.near.Create(ctx, creds[i]); err != nil {
			t.Fatalf("create: %v", err)
		}
	}
	b.c.WaitCurrent("KV_cred_"+b.name, "KV_lease_"+b.name)
	eventually(t, 10*time.Second, "direct gets through the third node are answered", func() bool {
		_, _, err := b.far.Get(ctx, creds[0].Key)
		return err == nil
	})
	b.c.Lag(b.lagging, 100*time.Millisecond)
	var (
		mu          sync.Mutex
		spent       int // Fence handed B a revision older than A stored: a spent refresh token presented
		staleDirect int // a direct get through B's node returned an older revision than A stored
		quiet       int // rounds where B's claim found the key empty
	)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			c, last := creds[i], created[i] // last: the revision stored last
			for round := range rounds {
				// B reads first, as a refresher that picked up a 401 just
				// before A's rotation.
				bc, bread, err := b.far.Load(ctx, c.Key)
				if err != nil {
					t.Errorf("B load: %v", err)
					return
				}
				// A rotates under its lease.
				ac, aread, err := b.near.Load(ctx, c.Key)
				if err != nil {
					t.Errorf("A load: %v", err)
					return
				}
				aClaimedAt := time.Now()
				al, err := b.nearL.Claim(ctx, c.Key, "A", aread)
				if err != nil {
					t.Errorf("A claim: %v", err)
					return
				}
				ac, arev, err := b.near.Fence(ctx, al, ac)
				if err != nil {
					t.Errorf("A fence: %v", err)
					_ = al.Release(ctx)
					return
				}
				if arev < last {
					// A would present the refresh token its previous
					// round redeemed.
					mu.Lock()
					spent++
					mu.Unlock()
					_ = al.Release(ctx)
					continue
				}
				n := ac.Clone()
				n.Version++
				stored, err := b.near.UpdateUnder(ctx, al, n, arev)
				if rerr := al.Release(ctx); err != nil || rerr != nil {
					t.Errorf("A store %v, release %v (%s)", err, rerr, b.leaseNow(ctx, al, aClaimedAt))
					return
				}
				if round%10 == 9 {
					// Remove A's release marker, as its TTL would: B's
					// claim then finds the key empty.
					if err := b.farL.stream.Purge(ctx, jetstream.WithPurgeSubject(b.farL.subPrefix+c.Key.String())); err != nil {
						t.Errorf("remove A's marker: %v", err)
						return
					}
				}
				// B claims after A released, then fences its old read.
				bl, err := b.farL.Claim(ctx, c.Key, "B", bread)
				if err != nil {
					t.Errorf("B claim: %v", err)
					return
				}
				direct, err := b.farJS.Conn().Request(b.far.api+"DIRECT.GET."+b.far.stream+"."+b.far.subPrefix+c.Key.String(), nil, 5*time.Second)
				if err != nil {
					t.Errorf("B direct get: %v", err)
					_ = bl.Release(ctx)
					return
				}
				claimedAt := time.Now()
				_, brev, err := b.far.Fence(ctx, bl, bc)
				if rerr := bl.Release(ctx); err != nil || rerr != nil {
					t.Errorf("B fence %v, release %v (%s)", err, rerr, b.leaseNow(ctx, bl, claimedAt))
					return
				}
				mu.Lock()
				if brev < stored {
					spent++
				}
				last = stored
				if seq := direct.Header.Get(jetstream.SequenceHeader); seq != fmt.Sprint(stored) {
					staleDirect++
				}
				if round%10 == 9 {
					quiet++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	t.Logf("%d contested claims (%d over an empty key): %d of B's direct gets were stale, %d fences handed out a spent revision",
		keys*rounds, quiet, staleDirect, spent)
	if spent != 0 {
		t.Errorf("Fence handed out a revision older than the one stored before the claim %d times: a spent refresh token would be presented", spent)
	}
	// Without stale direct gets the test would prove nothing: the lag must
	// be real.
	if staleDirect < keys*rounds/50 {
		t.Errorf("only %d of %d direct gets were stale: the follower does not lag enough for this test to mean anything", staleDirect, keys*rounds)
	}
}
