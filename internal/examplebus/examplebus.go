// Package examplebus runs authbus inside one process for the runnable
// examples of the public packages: an embedded NATS server with JetStream
// and one refresher pool, on a temporary data directory. Examples cannot
// use the test helpers (internal/fleet), which need a *testing.T; this
// package stops the program with log.Fatal instead, as examples do.
package examplebus

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/embedded"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// Bus is a running authbus: NATS and one refresher.
type Bus struct {
	// NC is a runtime's connection to the bus.
	NC *nats.Conn

	dir    string
	srv    *server.Server
	poolNC *nats.Conn
	cancel context.CancelFunc
	done   chan error
}

// Start starts NATS and a refresher, and returns once the refresher
// answers.
func Start() *Bus {
	dir, err := os.MkdirTemp("", "authbus-example")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	poolNC, err := nats.Connect(srv.ClientURL())
	if err != nil {
		log.Fatal(err)
	}
	ring, err := kv.NewKeyRing("k1", map[string][]byte{"k1": bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		log.Fatal(err)
	}
	pool, err := workers.New(context.Background(), poolNC, workers.Config{
		Seal:       ring,
		Logger:     slog.New(slog.DiscardHandler),
		TokenHosts: egress.Policy{AllowLoopback: true}, // the embedded dev mode
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Bus{dir: dir, srv: srv, poolNC: poolNC, cancel: cancel, done: make(chan error, 1)}
	go func() { b.done <- pool.Run(ctx) }()
	if b.NC, err = nats.Connect(srv.ClientURL()); err != nil {
		log.Fatal(err)
	}
	return b
}

// Register registers key ("tenant.user.server") with accessToken, valid
// for an hour, and refreshToken (none when ""), as a login would hand them
// over. The token endpoint is never called: the examples need no refresh.
func (b *Bus) Register(key, accessToken, refreshToken string) {
	body, _ := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: accessToken, TokenType: "Bearer", RefreshToken: refreshToken, ExpiresIn: 3600},
		TokenEndpoint: "http://127.0.0.1:9/token",
		ClientID:      "example",
	})
	subj, _ := events.NewSubjects("")
	k, err := events.ParseKey(key)
	if err != nil {
		log.Fatal(err)
	}
	// The pool starts its service in the background: poll until it
	// answers, for at most 10s.
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	deadline := time.After(10 * time.Second)
	for {
		reply, err := b.NC.Request(subj.Register(k), body, 5*time.Second)
		if errors.Is(err, nats.ErrNoResponders) {
			select {
			case <-poll.C:
				continue
			case <-deadline:
			}
		}
		if err != nil || reply.Header.Get("Nats-Service-Error-Code") != "" {
			log.Fatalf("register: %v %v", err, reply)
		}
		return
	}
}

// Stop stops the refresher and NATS and removes the data directory.
func (b *Bus) Stop() {
	b.NC.Close()
	b.cancel()
	if err := <-b.done; err != nil {
		log.Print(err)
	}
	b.poolNC.Close()
	b.srv.Shutdown()
	b.srv.WaitForShutdown()
	os.RemoveAll(b.dir)
}
