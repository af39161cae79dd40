package workers_test

import (
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// BenchmarkReconcile registers AUTHBUS_SCALE credentials (default 100 000)
// with hour-long tokens, so that each has a pending schedule, removes the
// schedules of 1 % of them, and times passes of the reconciler: the first
// restores what is missing, the ones after find everything in place (the
// steady state of a fleet). It reports the time of a pass (ns/op) and per
// credential, and the schedules restored over all passes.
//
//	AUTHBUS_SCALE=1000000 go test -run '^$' -bench Reconcile -benchtime 3x -timeout 60m ./workers/
func BenchmarkReconcile(b *testing.B) {
	n := scaleN(b)
	bd := fleet.Setup(b)
	bd.StartPools(b, 1, func(c *workers.Config) {
		c.Logger = slog.New(slog.NewJSONHandler(bd.Logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
		c.ReconcileEvery = -1
	})
	pool := bd.Pools[0].Pool
	tok := bd.AS.Issue(fleet.ClientID)
	key := func(i int) events.Key { return fleet.MustKey(b, fmt.Sprintf("rec.user%d.api", i)) }
	start := time.Now()
	var wg sync.WaitGroup
	work := make(chan int, 1024)
	for range 64 {
		wg.Go(func() {
			for i := range work {
				if _, err := bd.TryRegister(key(i), tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 3600 }); err != nil {
					b.Errorf("register %d: %v", i, err)
				}
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	b.Logf("registered %d credentials with schedules in %v", n, time.Since(start).Round(time.Millisecond))
	stream, err := bd.JS.Stream(b.Context(), bd.Subj.SchedulesStream())
	if err != nil {
		b.Fatal(err)
	}
	lost := n / 100
	for i := range lost {
		if err := stream.Purge(b.Context(), jetstream.WithPurgeSubject(bd.Subj.Schedule(key(i*100)))); err != nil {
			b.Fatal(err)
		}
	}
	restored := 0
	for b.Loop() {
		rep, err := pool.Reconcile(b.Context())
		if err != nil {
			b.Fatal(err)
		}
		if rep.Credentials != n || rep.Failed != 0 {
			b.Fatalf("pass %+v: want %d credentials, none failed", rep, n)
		}
		restored += rep.Restored
		b.Logf("pass: %+v", rep)
	}
	if restored != lost {
		b.Errorf("restored %d schedules over all passes, want %d", restored, lost)
	}
	b.ReportMetric(float64(restored), "restored")
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*n), "µs/cred")
}
