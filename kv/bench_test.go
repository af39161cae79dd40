package kv

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkClaimRelease measures one lease cycle, Claim then release, and
// reports the messages it sends (msgs/op: one per round trip).
//
// Release methods: "Release" is Lease.Release (a fenced purge whose marker
// expires after a second); "kvDelete" is the fenced kv.Delete it replaced,
// kept as the baseline, whose marker stays for good.
//
// Reclaim patterns: "sameKey" claims one key again right after releasing it
// (both methods find a marker: 3 round trips to claim); "later" cycles
// through keys released long before, as refreshes of a credential are
// spaced in practice (a Delete marker is still there, a Release marker is
// gone: 1 round trip to claim).
func BenchmarkClaimRelease(b *testing.B) {
	type releaseFunc func(ctx context.Context, tb *testBundle, l *Lease) error
	methods := []struct {
		name    string
		release releaseFunc
	}{
		{"Release", func(ctx context.Context, _ *testBundle, l *Lease) error {
			return l.Release(ctx)
		}},
		{"kvDelete", func(ctx context.Context, tb *testBundle, l *Lease) error {
			return tb.leases.kv.Delete(ctx, l.Key().String(), jetstream.LastRevision(l.Revision()))
		}},
	}
	// More keys than a benchmark run gets through in a second, so a key is
	// never reclaimed within the release marker's lifetime.
	const laterKeys = 16384
	for _, m := range methods {
		for _, pattern := range []string{"sameKey", "later"} {
			b.Run(m.name+"/"+pattern, func(b *testing.B) {
				tb := setup(b)
				cycle := func(k events.Key) {
					l, err := tb.leases.Claim(tb.ctx, k, "bench", Read{})
					if err != nil {
						b.Fatal(err)
					}
					if err := m.release(tb.ctx, tb, l); err != nil {
						b.Fatal(err)
					}
				}
				keys := []events.Key{leaseKey}
				if pattern == "later" {
					keys = make([]events.Key, laterKeys)
					for i := range keys {
						keys[i] = events.Key{Tenant: "bench", User: fmt.Sprintf("u%d", i), Server: "s"}
						cycle(keys[i])
					}
					if m.name == "Release" {
						eventually(b, 30*time.Second, "release markers expire", func() bool {
							st, err := tb.leases.kv.Status(tb.ctx)
							return err == nil && st.Values() == 0
						})
					}
				}
				b.ReportAllocs()
				sent := tb.nc.Stats().OutMsgs
				i := 0
				for b.Loop() {
					cycle(keys[i%len(keys)])
					i++
				}
				b.ReportMetric(float64(tb.nc.Stats().OutMsgs-sent)/float64(b.N), "msgs/op")
			})
		}
	}
}
