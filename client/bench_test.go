package client_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/fleet"
)

// BenchmarkRoundTrip401 measures what a caller of the Transport sees when
// the API refuses its token: one request that gets 401, reports it, waits
// for the refreshers' new token and is replayed. Each iteration retires the
// current token and sends one request; it reports the p50 and p99 latency of
// those requests, with a token endpoint that answers at once and one that
// takes 100 ms.
//
//	go test -run '^$' -bench RoundTrip401 -benchtime 100x ./client/
func BenchmarkRoundTrip401(b *testing.B) {
	for _, latency := range []time.Duration{0, 100 * time.Millisecond} {
		b.Run(fmt.Sprintf("token-endpoint=%dms", latency.Milliseconds()), func(b *testing.B) {
			bd := setup(b, nil)
			bd.f.AS.SetLatency(latency)
			src, _ := bd.newSource(b)
			hc := httpClient(b, src)
			mustGet200(b, hc, bd.api.URL, "warm-up")
			callsBefore, hitsBefore := bd.f.AS.Calls(), bd.api.Hits()

			took := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			leases := bd.f.Pools[0].Pool.Leases()
			for i := range b.N {
				// Measure an isolated 401: the refresher publishes the new
				// token before it releases its lease, and a 401 sent in that
				// gap waits LeaseWait for the lease.
				b.StopTimer()
				fleet.Eventually(b, 10*time.Second, "the previous refresh released its lease", func() bool {
					_, held, err := leases.Holder(context.Background(), bd.key)
					return err == nil && !held
				})
				b.StartTimer()
				tok, err := src.Token()
				if err != nil {
					b.Fatal(err)
				}
				bd.api.Retire(tok.AccessToken)
				start := time.Now()
				status, _, err := get(context.Background(), hc, bd.api.URL, fmt.Sprint(i))
				took = append(took, time.Since(start))
				if err != nil || status != http.StatusOK {
					b.Fatalf("request %d: status %d err %v", i, status, err)
				}
			}
			b.StopTimer()

			if calls, hits := bd.f.AS.Calls()-callsBefore, bd.api.Hits()-hitsBefore; calls != b.N || hits != 2*b.N {
				b.Fatalf("%d token calls and %d API hits for %d requests; want one call and two hits each", calls, hits, b.N)
			}
			slices.Sort(took)
			b.ReportMetric(ms(took[len(took)/2]), "p50-ms")
			b.ReportMetric(ms(took[(len(took)*99)/100]), "p99-ms")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
