package workers_test

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// BenchmarkRefresh is one refresh through a pool, end to end and one at a
// time: a runtime publishes auth.401 for the current token and waits for
// auth.rotated of the next version. ns/op is the 401→rotated latency with a
// token endpoint that answers at once; allocs/op and B/op are per refresh
// for the whole process (the pool, and also the embedded NATS server, the
// test authorization server and the runtime's client, which run in it
// too), so they bound the pool's own share from above.
//
//	go test -run '^$' -bench Refresh -benchmem ./workers/
func BenchmarkRefresh(b *testing.B) {
	bd := fleet.Setup(b)
	bd.AS.SetExpiresIn(3600)
	// Logs at info, as in production, formatted and dropped.
	bd.StartPools(b, 1, func(c *workers.Config) {
		c.Logger = slog.New(slog.NewJSONHandler(io.Discard, nil))
	})
	key := fleet.MustKey(b, "bench.user.api")
	reply := bd.Register(b, key, bd.AS.Issue(fleet.ClientID), nil)

	rotated := make(chan *events.Rotated, 16)
	sub, err := bd.NC.Subscribe(bd.Subj.Event(events.TypeRotated, key), func(m *nats.Msg) {
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err == nil {
			rotated <- ev.Rotated
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := bd.NC.Flush(); err != nil {
		b.Fatal(err)
	}
	fp, version := reply.Fingerprint, reply.Version
	calls := bd.AS.Calls()

	b.ReportAllocs()
	for b.Loop() {
		bd.Publish401(b, key, fp, "bench", true)
		deadline := time.After(10 * time.Second)
		for done := false; !done; {
			select {
			case r := <-rotated:
				if r.Version > version {
					fp, version, done = r.Fingerprint, r.Version, true
				}
			case <-deadline:
				b.Fatalf("no auth.rotated after version %d within 10s", version)
			}
		}
	}
	if got := bd.AS.Calls() - calls; got != b.N {
		b.Fatalf("%d token calls for %d refreshes", got, b.N)
	}
}
