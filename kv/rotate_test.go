package kv

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

func TestAddAndRetireKeys(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys.json")
	first, _, err := LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	sealed, _ := first.Seal([]byte("rt"), []byte("a.b.c"))

	id, err := AddKey(path)
	if err != nil {
		t.Fatalf("AddKey: %v", err)
	}
	assertMode(t, path, 0o600)
	ring, err := loadKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	if ring.ActiveID() != id || id == first.ActiveID() || len(ring.IDs()) != 2 {
		t.Fatalf("after AddKey: active %q ids %v, want new id %q active among 2", ring.ActiveID(), ring.IDs(), id)
	}
	if pt, err := ring.Open(sealed, []byte("a.b.c")); err != nil || string(pt) != "rt" {
		t.Fatalf("value sealed before the rotation does not open: %q %v", pt, err)
	}
	id3, _ := AddKey(path)
	if id3 <= id {
		t.Errorf("key ids do not sort in the order added: %q then %q", id, id3)
	}

	// A key in use stays; the active key always stays.
	removed, err := RetireKeys(path, map[string]int{first.ActiveID(): 1})
	if err != nil || !slices.Equal(removed, []string{id}) {
		t.Fatalf("RetireKeys with the first key in use: removed %v, %v; want [%s]", removed, err, id)
	}
	removed, err = RetireKeys(path, nil)
	if err != nil || !slices.Equal(removed, []string{first.ActiveID()}) {
		t.Fatalf("RetireKeys with nothing in use: removed %v, %v", removed, err)
	}
	ring, _ = loadKeyRing(path)
	if !slices.Equal(ring.IDs(), []string{id3}) {
		t.Fatalf("ids after retiring: %v, want [%s]", ring.IDs(), id3)
	}
	assertMode(t, path, 0o600)
	if _, err := ring.Open(sealed, []byte("a.b.c")); err == nil {
		t.Error("a value sealed with a retired key still opens")
	}
}

func TestAddKeyRefusesOpenKeyFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys.json")
	if _, _, err := LoadOrCreateKeyRing(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := AddKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600 "+path) {
		t.Fatalf("AddKey on a 0644 key file: %v, want an error saying chmod 600", err)
	}
}

// Reseal on real NATS: every credential ends sealed with the new key, a
// writer racing the reseal (a refresher on the new ring) never loses a
// write, a credential being refreshed is left alone and reported busy, and
// retiring keeps the key it still uses.
func TestReseal(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "keys.json")
	oldRing, _, err := LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	bucket := "cred_" + bucketName(t) + "_r"
	oldStore, err := NewStore(ctx, b.js, StoreConfig{Bucket: bucket}, oldRing)
	if err != nil {
		t.Fatal(err)
	}
	const n = 40
	for i := range n {
		if _, err := oldStore.Create(ctx, testCredential(t, fmt.Sprintf("acme.u%d.github", i))); err != nil {
			t.Fatal(err)
		}
	}

	newID, err := AddKey(path)
	if err != nil {
		t.Fatal(err)
	}
	newRing, err := loadKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	store, err := OpenStore(ctx, b.js, bucket, newRing)
	if err != nil {
		t.Fatal(err)
	}
	usage, err := store.KeyUsage(ctx)
	if err != nil || !maps.Equal(usage, map[string]int{oldRing.ActiveID(): n}) {
		t.Fatalf("usage before reseal: %v %v", usage, err)
	}

	// A refresh in flight on credential 0: its lease is held throughout.
	leases, err := NewLeases(ctx, b.js, LeaseConfig{Bucket: "lease_" + bucketName(t) + "_r", TTL: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	busyKey := testCredential(t, "acme.u0.github").Key
	held, err := leases.Claim(ctx, busyKey, "refresher-x", Read{})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release(ctx)

	// A writer on the new ring bumps versions while the reseal runs.
	var mu sync.Mutex
	lastVersion := map[string]int64{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// Odd credentials only: the even ones are left for the reseal.
			k := testCredential(t, fmt.Sprintf("acme.u%d.github", 1+2*(i%(n/2)))).Key
			c, rev, err := store.Get(ctx, k)
			if err != nil {
				t.Errorf("writer get: %v", err)
				return
			}
			c.Version++
			if _, err := store.Update(ctx, c, rev); err == nil {
				mu.Lock()
				lastVersion[k.String()] = c.Version
				mu.Unlock()
			}
		}
	})

	// The tool binds to the refreshers' bucket without reconfiguring it.
	toolLeases, err := OpenLeases(ctx, b.js, "lease_"+bucketName(t)+"_r", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := store.Reseal(ctx, toolLeases, "keys-rotate")
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("Reseal: %v (report %+v)", err, rep)
	}
	t.Logf("reseal report: %+v", rep)
	if rep.Scanned != n || rep.Busy != 1 || rep.Resealed+rep.Current != n-1 || rep.Failed != 0 {
		t.Errorf("report %+v: want %d scanned, 1 busy, the rest resealed or current", rep, n)
	}

	usage, err = store.KeyUsage(ctx)
	if err != nil || !maps.Equal(usage, map[string]int{newID: n - 1, oldRing.ActiveID(): 1}) {
		t.Fatalf("usage after reseal: %v %v; want %d on %s and the busy one on the old key", usage, err, n-1, newID)
	}
	mu.Lock()
	for k, v := range lastVersion {
		key, _ := events.ParseKey(k)
		c, _, err := store.Get(ctx, key)
		if err != nil || c.Version != v {
			t.Errorf("%s: version %d after reseal, the writer's last was %d (%v)", k, c.Version, v, err)
		}
	}
	mu.Unlock()

	// Retire keeps the key the busy credential uses; after it is resealed
	// the old key goes, and every credential opens without it.
	if removed, err := RetireKeys(path, usage); err != nil || len(removed) != 0 {
		t.Fatalf("retire while the old key is in use: removed %v, %v", removed, err)
	}
	if err := held.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if rep, err := store.Reseal(ctx, toolLeases, "keys-rotate"); err != nil || rep.Resealed != 1 {
		t.Fatalf("second reseal: %+v %v, want 1 resealed", rep, err)
	}
	usage, _ = store.KeyUsage(ctx)
	removed, err := RetireKeys(path, usage)
	if err != nil || !slices.Equal(removed, []string{oldRing.ActiveID()}) {
		t.Fatalf("retire: removed %v, %v", removed, err)
	}
	onlyNew, err := loadKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	final, _ := OpenStore(ctx, b.js, bucket, onlyNew)
	for i := range n {
		k := testCredential(t, fmt.Sprintf("acme.u%d.github", i)).Key
		c, _, err := final.Get(ctx, k)
		if err != nil || c.RefreshToken.Reveal() != "rt-plain-refresh-token-"+k.String() {
			t.Errorf("%s does not open with the new key alone: %v", k, err)
		}
	}
}

// A record an older version wrote (schema 1 or 2, whose seals bind less)
// is rewritten by Reseal even when its key is the active one, so that
// after one reseal every record has the binding of the current schema.
func TestResealUpgradesOlderSchemas(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, schema := range []int{1, 2} {
		c := testCredential(t, fmt.Sprintf("acme.old%d.github", schema))
		if _, err := b.store.Bucket().Put(b.ctx, c.Key.String(), legacyRecord(t, b.ring, c, schema)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.store.Create(b.ctx, testCredential(t, "acme.new.github")); err != nil {
		t.Fatal(err)
	}
	rep, err := b.store.Reseal(b.ctx, b.leases, "keys-reseal")
	if err != nil || rep.Scanned != 3 || rep.Resealed != 2 || rep.Current != 1 {
		t.Fatalf("Reseal = %+v, %v; want 3 scanned, the 2 older records resealed, 1 current", rep, err)
	}
	for _, key := range []string{"acme.old1.github", "acme.old2.github"} {
		entry, err := b.store.Bucket().Get(b.ctx, key)
		if err != nil || !strings.Contains(string(entry.Value()), `"schema":3`) {
			t.Errorf("%s after reseal: %s %v, want schema 3", key, entry.Value(), err)
		}
		c, _, err := b.store.Get(b.ctx, testCredential(t, key).Key)
		if err != nil || c.RefreshToken.Reveal() != "rt-plain-refresh-token-"+key {
			t.Errorf("%s does not open after reseal: %v", key, err)
		}
	}
}
