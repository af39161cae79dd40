package kv

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// BenchmarkClaimRelease measures one lease cycle on the same key, as when a
// credential is refreshed again soon after its last refresh. "Release" is
// Lease.Release (a fenced purge that leaves nothing behind); the others
// release with the KV API instead and are kept as the baseline it was
// chosen over: both leave a marker, so each next Claim costs three round
// trips instead of one.
func BenchmarkClaimRelease(b *testing.B) {
	for _, bc := range []struct {
		name    string
		release func(ctx context.Context, tb *testBundle, l *Lease) error
	}{
		{"Release", func(ctx context.Context, _ *testBundle, l *Lease) error {
			return l.Release(ctx)
		}},
		{"kvDelete", func(ctx context.Context, tb *testBundle, l *Lease) error {
			return tb.leases.kv.Delete(ctx, l.Key().String(), jetstream.LastRevision(l.Revision()))
		}},
		{"kvPurge", func(ctx context.Context, tb *testBundle, l *Lease) error {
			return tb.leases.kv.Purge(ctx, l.Key().String(), jetstream.LastRevision(l.Revision()))
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			tb := setup(b)
			b.ReportAllocs()
			for b.Loop() {
				l, err := tb.leases.Claim(tb.ctx, leaseKey, "bench")
				if err != nil {
					b.Fatal(err)
				}
				if err := bc.release(tb.ctx, tb, l); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
