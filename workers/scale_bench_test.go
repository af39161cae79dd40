package workers_test

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
)

// BenchmarkScale registers AUTHBUS_SCALE credentials (default 100 000) in
// batches on one embedded server and three pools, then runs a 1 000 × 20
// storm among them. It reports the process's resident memory (embedded
// NATS server, pools and test authorization server together), the bytes the
// credentials bucket stores per credential, and the storm's figures.
//
//	AUTHBUS_SCALE=1000000 go test -run '^$' -bench Scale -benchtime 1x -timeout 60m ./workers/
func BenchmarkScale(b *testing.B) {
	n := 100_000
	if v := os.Getenv("AUTHBUS_SCALE"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1000 {
			b.Fatalf("AUTHBUS_SCALE=%q: want a number ≥ 1000", v)
		}
	}
	for range b.N {
		bd := fleet.Setup(b)
		bd.AS.SetExpiresIn(0) // no schedules: this measures the store, not the scheduler
		bd.StartPools(b, 3, nil)
		// The storm's credentials hold tokens of their own (one rotation
		// each); the rest share one, never refreshed.
		const creds, publishers = 1000, 20
		shared := bd.AS.Issue(fleet.ClientID)
		fps := make([]string, creds)
		start := time.Now()
		var wg sync.WaitGroup
		work := make(chan int, 1024)
		for range 64 {
			wg.Go(func() {
				for i := range work {
					tok := shared
					if i < creds {
						tok = bd.AS.Issue(fleet.ClientID)
						fps[i] = events.Fingerprint(tok.AccessToken)
					}
					if _, err := bd.TryRegister(fleet.MustKey(b, fmt.Sprintf("scale.user%d.api", i)), tok,
						func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 }); err != nil {
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
		b.Logf("registered %d credentials in %v", n, time.Since(start).Round(time.Millisecond))
		runtime.GC()

		kvs, err := bd.JS.KeyValue(b.Context(), bd.Subj.BucketName("CREDENTIALS"))
		if err != nil {
			b.Fatal(err)
		}
		st, err := kvs.Status(b.Context())
		if err != nil {
			b.Fatal(err)
		}
		// Reported at the end: ResetTimer drops metrics reported before it.
		kvPerCred, rss := float64(st.Bytes())/float64(n), float64(rssBytes(b))/(1<<20)

		// A storm among them: the first 1 000 keys, 20 runtimes each.
		rot := bd.WatchRotations(b, 2, creds)
		b.ResetTimer()
		t0 := time.Now()
		var pw sync.WaitGroup
		for p := range publishers {
			pw.Go(func() {
				for i := range creds {
					k := (i + p*creds/publishers) % creds
					bd.Publish401(b, fleet.MustKey(b, fmt.Sprintf("scale.user%d.api", k)), fps[k], fmt.Sprint("rt-", p), true)
				}
			})
		}
		pw.Wait()
		select {
		case <-rot.Done:
		case <-time.After(2 * time.Minute):
			b.Fatalf("only %d of %d rotated within 2m", rot.Count(), creds)
		}
		b.StopTimer()
		d := time.Since(t0)
		b.ReportMetric(float64(creds*publishers)/d.Seconds(), "events/s")
		b.ReportMetric(float64(creds)/d.Seconds(), "rotations/s")
		b.ReportMetric(float64(bd.AS.Reuses()), "reuses")
		b.ReportMetric(kvPerCred, "kv-bytes/cred")
		b.ReportMetric(rss, "rss-MiB")
	}
}

// rssBytes reads the resident set size of this process from /proc.
func rssBytes(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Skipf("no /proc/self/status: %v", err)
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		if f := bytes.Fields(line); len(f) >= 2 && string(f[0]) == "VmRSS:" {
			kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
			return kb << 10
		}
	}
	return 0
}
