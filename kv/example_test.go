package kv_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func ExampleLeases() {
	ctx := context.Background()
	js, dir, stop := exampleJetStream()
	defer stop()

	ring, _, err := kv.LoadOrCreateKeyRing(filepath.Join(dir, "seal.json"))
	if err != nil {
		log.Fatal(err)
	}
	store, err := kv.NewStore(ctx, js, kv.StoreConfig{Bucket: "example_credentials"}, ring)
	if err != nil {
		log.Fatal(err)
	}
	leases, err := kv.NewLeases(ctx, js, kv.LeaseConfig{Bucket: "example_leases", TTL: 30 * time.Second})
	if err != nil {
		log.Fatal(err)
	}
	key, _ := events.ParseKey("acme.alice.github")
	if _, err := store.Create(ctx, &kv.Credential{Key: key, Version: 1, RefreshToken: "rt-1", State: kv.StateActive}); err != nil {
		log.Fatal(err)
	}

	// A refresh: read, claim (the claim is told what was read), fence.
	c, read, err := store.Load(ctx, key)
	if err != nil {
		log.Fatal(err)
	}
	lease, err := leases.Claim(ctx, key, "refresher-1", read)
	if err != nil {
		log.Fatal(err)
	}
	// The lease renews itself until released; Release purges its key only
	// if the lease is still ours, stating what the holder left behind.
	defer lease.Release(context.WithoutCancel(ctx))

	_, err = leases.Claim(ctx, key, "refresher-2", kv.Read{})
	fmt.Println("second claim held:", errors.Is(err, kv.ErrLeaseHeld))

	// Fence returns the record to act on: the one read, if the claim
	// proved it current, else the latest from the stream leader.
	c, rev, err := store.Fence(ctx, lease, c)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("acting on version", c.Version, "changed since the read:", rev != read.Revision)

	// Bound the token-endpoint call by the time the lease is trusted, and
	// store its result under the lease.
	callCtx, cancel := context.WithDeadline(ctx, lease.TrustedUntil())
	defer cancel()
	fmt.Println("may call:", callCtx.Err() == nil)
	c.Version, c.RefreshToken = 2, "rt-2"
	_, err = store.UpdateUnder(ctx, lease, c, rev)
	fmt.Println("stored:", err)
	// Output:
	// second claim held: true
	// acting on version 1 changed since the read: false
	// may call: true
	// stored: <nil>
}

func ExampleStore() {
	ctx := context.Background()
	js, dir, stop := exampleJetStream()
	defer stop()

	ring, _, err := kv.LoadOrCreateKeyRing(filepath.Join(dir, "seal.json"))
	if err != nil {
		log.Fatal(err)
	}
	store, err := kv.NewStore(ctx, js, kv.StoreConfig{Bucket: "example_credentials"}, ring)
	if err != nil {
		log.Fatal(err)
	}
	key, _ := events.ParseKey("acme.alice.github")
	if _, err := store.Create(ctx, &kv.Credential{
		Key: key, Version: 1, AccessToken: "at-1", RefreshToken: "rt-1", State: kv.StateActive,
	}); err != nil {
		log.Fatal(err)
	}

	// Two refreshers read the same revision; only the first write wins.
	c, rev, _ := store.Get(ctx, key)
	c.Version, c.AccessToken, c.RefreshToken = 2, "at-2", "rt-2"
	_, err = store.Update(ctx, c, rev)
	fmt.Println("first update:", err)
	_, err = store.Update(ctx, c, rev)
	fmt.Println("late update conflicts:", errors.Is(err, kv.ErrConflict))

	c, _, _ = store.Get(ctx, key)
	fmt.Println("version", c.Version, "refresh token", c.RefreshToken)
	// Output:
	// first update: <nil>
	// late update conflicts: true
	// version 2 refresh token [redacted]
}

func ExampleSecret() {
	rt := kv.Secret("rt-1")
	fmt.Printf("%v %q %#v\n", rt, rt, struct{ RT kv.Secret }{rt})
	fmt.Println(rt.Reveal())
	// Output:
	// [redacted] [redacted] struct { RT kv.Secret }{RT:[redacted]}
	// rt-1
}

// exampleJetStream starts an embedded NATS server with JetStream, its store
// in a new directory dir, and connects to it; stop shuts both down and
// removes dir.
func exampleJetStream() (js jetstream.JetStream, dir string, stop func()) {
	dir, err := os.MkdirTemp("", "kv-example-*")
	if err != nil {
		log.Fatal(err)
	}
	s, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: dir, NoLog: true, NoSigs: true,
	})
	if err != nil {
		log.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		log.Fatal("server not ready")
	}
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		log.Fatal(err)
	}
	js, err = jetstream.New(nc)
	if err != nil {
		log.Fatal(err)
	}
	return js, dir, func() {
		nc.Close()
		s.Shutdown()
		s.WaitForShutdown()
		os.RemoveAll(dir)
	}
}
