package workers_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// BenchmarkStorm is the 401 storm of the core issue: K credentials, N
// runtimes each reporting a 401 for the same token at once, three pools. It
// reports publish throughput, token-endpoint calls and reuses per storm, and
// the latency from a credential's first 401 to its auth.rotated.
//
//	go test -run '^$' -bench Storm -benchtime 1x ./workers/
func BenchmarkStorm(b *testing.B) {
	for _, size := range []struct{ creds, publishers int }{{1000, 20}} {
		b.Run(fmt.Sprintf("creds=%d/publishers=%d/pools=3", size.creds, size.publishers), func(b *testing.B) {
			for range b.N {
				runStorm(b, size.creds, size.publishers)
			}
		})
	}
}

func runStorm(b *testing.B, creds, publishers int) {
	b.StopTimer()
	bd := fleet.Setup(b)
	bd.StartPools(b, 3, nil)
	keys := make([]events.Key, creds)
	fps := make([]string, creds)
	for i := range creds {
		keys[i] = fleet.MustKey(b, fmt.Sprintf("storm.user%d.api", i))
		tok := bd.AS.Issue(fleet.ClientID)
		bd.Register(b, keys[i], tok, nil)
		fps[i] = events.Fingerprint(tok.AccessToken)
	}
	callsBefore := bd.AS.Calls()

	var mu sync.Mutex
	first := make(map[string]time.Time, creds)
	rotations := bd.WatchRotations(b, 2, creds)

	b.StartTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			for i := range creds {
				// Runtimes do not arrive in the same order.
				i := (i + p*creds/publishers) % creds
				now := time.Now()
				mu.Lock()
				if _, ok := first[keys[i].String()]; !ok {
					first[keys[i].String()] = now
				}
				mu.Unlock()
				bd.Publish401(b, keys[i], fps[i], fmt.Sprintf("runtime-%d", p), true)
			}
		})
	}
	wg.Wait()
	published := time.Since(start)
	select {
	case <-rotations.Done:
	case <-time.After(2 * time.Minute):
		b.Fatalf("only %d of %d credentials rotated within 2m", rotations.Count(), creds)
	}
	total := time.Since(start)
	b.StopTimer()

	lat := make([]time.Duration, 0, creds)
	mu.Lock()
	for k, at := range rotations.At() {
		lat = append(lat, at.Sub(first[k]))
	}
	mu.Unlock()
	slices.Sort(lat)
	events := float64(creds * publishers)
	b.ReportMetric(events/published.Seconds(), "published/s")
	b.ReportMetric(events/total.Seconds(), "events/s")
	b.ReportMetric(float64(creds)/total.Seconds(), "rotations/s")
	b.ReportMetric(float64(bd.AS.Calls()-callsBefore), "calls")
	b.ReportMetric(float64(bd.AS.Reuses()), "reuses")
	b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Milliseconds()), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Milliseconds()), "max-ms")
}
