package kv

import (
	"context"
	"crypto/rand"
	"regexp"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/natstest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testBundle is what a kv test needs: a real embedded server, a connection
// of its own, and a store and lease bucket named after the test.
type testBundle struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	ring   *KeyRing
	store  *Store
	leases *Leases
	ctx    context.Context
}

const testLeaseTTL = 2 * time.Second

func setup(t testing.TB) *testBundle {
	t.Helper()
	ctx := context.Background()
	s := natstest.RunServer(t)
	nc, js := natstest.JetStream(t, s)
	ring := testRing(t)
	name := bucketName(t)
	store, err := NewStore(ctx, js, StoreConfig{Bucket: "cred_" + name}, ring)
	if err != nil {
		t.Fatalf("NewStore: %v", err)
	}
	leases, err := NewLeases(ctx, js, LeaseConfig{Bucket: "lease_" + name, TTL: testLeaseTTL})
	if err != nil {
		t.Fatalf("NewLeases: %v", err)
	}
	return &testBundle{nc: nc, js: js, ring: ring, store: store, leases: leases, ctx: ctx}
}

var notBucketChar = regexp.MustCompile(`[^A-Za-z0-9_-]`)

// bucketName turns the test's name into a bucket name of its own, so tests
// never share a bucket even if they share a server.
func bucketName(t testing.TB) string {
	return notBucketChar.ReplaceAllString(t.Name(), "_")
}

func testRing(t testing.TB) *KeyRing {
	t.Helper()
	key := make([]byte, keySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	ring, err := NewKeyRing("test-1", map[string][]byte{"test-1": key})
	if err != nil {
		t.Fatalf("NewKeyRing: %v", err)
	}
	return ring
}

// eventually polls cond every 50ms until it is true or timeout has passed.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		<-tick.C
	}
}

// liveness bounds a wait for something that must happen by itself (a
// lease noticing it was taken over, giving up): generous, because the
// tests assert that it happens and in which order, not how fast, and a
// busy machine runs timers late.
const liveness = 30 * time.Second
