package workers_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// BenchmarkExpiryWave registers credentials whose tokens all expire within
// the same few seconds and lets the proactive schedules refresh them, on
// three pools: 2 000 with a 20 s lifetime (issue 5, done-when 2) and 10 000
// with a 60 s lifetime (the expiry wave of the issue's note). It reports the
// token-endpoint calls, the peak calls in any one second, the time from the
// first call to the last (the drain), and how many credentials were
// refreshed only after they expired.
//
//	go test -run '^$' -bench ExpiryWave -benchtime 1x -timeout 10m ./workers/
func BenchmarkExpiryWave(b *testing.B) {
	for _, size := range []struct{ creds, lifetime int }{{2000, 20}, {10_000, 60}} {
		b.Run(fmt.Sprintf("creds=%d/lifetime=%ds", size.creds, size.lifetime), func(b *testing.B) {
			for range b.N {
				runExpiryWave(b, size.creds, size.lifetime)
			}
		})
	}
}

func runExpiryWave(b *testing.B, creds, lifetime int) {
	bd := fleet.Setup(b)
	bd.AS.SetExpiresIn(3600)
	bd.StartPools(b, 3, nil)
	expires := make(map[string]time.Time, creds)
	var mu sync.Mutex
	var wg sync.WaitGroup
	work := make(chan int)
	for range 64 {
		wg.Go(func() {
			for i := range work {
				tok := bd.AS.Issue(fleet.ClientID)
				reg, err := bd.TryRegister(fleet.MustKey(b, fmt.Sprintf("wave.user%d.api", i)), tok,
					func(r *events.RegisterRequest) { r.Token.ExpiresIn = int64(lifetime) })
				if err != nil {
					b.Errorf("register: %v", err)
					continue
				}
				mu.Lock()
				expires[tok.RefreshToken] = reg.ExpiresAt
				mu.Unlock()
			}
		})
	}
	regStart := time.Now()
	for i := range creds {
		work <- i
	}
	close(work)
	wg.Wait()
	b.Logf("registered %d credentials in %v", creds, time.Since(regStart).Round(time.Millisecond))
	if err := bd.AS.WaitCalls(b.Context(), creds); err != nil {
		b.Fatalf("waiting for %d refreshes: %v", creds, err)
	}
	bd.Settled(b)
	calls := bd.AS.CallLog()
	perSecond := map[int64]int{}
	late := 0
	first, last := calls[0].At, calls[0].At
	for _, c := range calls {
		perSecond[c.At.Unix()]++
		if c.At.Before(first) {
			first = c.At
		}
		if c.At.After(last) {
			last = c.At
		}
		if exp, ok := expires[c.RefreshToken]; !ok || !c.At.Before(exp) {
			late++
		}
	}
	peak := 0
	for _, n := range perSecond {
		peak = max(peak, n)
	}
	b.ReportMetric(float64(len(calls)), "calls")
	b.ReportMetric(float64(bd.AS.Reuses()), "reuses")
	b.ReportMetric(float64(peak), "peak-calls/s")
	b.ReportMetric(last.Sub(first).Seconds(), "drain-s")
	b.ReportMetric(float64(late), "late")
}
