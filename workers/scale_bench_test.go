package workers_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// BenchmarkScale registers AUTHBUS_SCALE credentials (default 100 000) in
// batches on one embedded server and three pools, once, then runs a
// 1 000 × 20 storm among them per iteration (the storm's 1 000 credentials
// registered again with fresh tokens before each, untimed). It reports the
// process's resident memory (embedded NATS server, pools and test
// authorization server together), the bytes the credentials bucket stores
// per credential, and the storms' figures.
//
//	AUTHBUS_SCALE=1000000 go test -run '^$' -bench Scale -benchtime 1x -timeout 60m ./workers/
func BenchmarkScale(b *testing.B) {
	n := scaleN(b)
	bd := fleet.Setup(b)
	bd.AS.SetExpiresIn(0) // no schedules: this measures the store, not the scheduler
	bd.StartPools(b, 3, func(c *workers.Config) {
		// fleet's pools log every registration at debug level into memory:
		// at a million that buffer alone grew to half a gigabyte, and each
		// doubling copied it while every pool waited to log (issue 16).
		c.Logger = slog.New(slog.NewJSONHandler(bd.Logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
		// The reconciler's first read of a million tokens without expiry
		// would run in the middle of the measurement: BenchmarkReconcile
		// measures it on its own.
		c.ReconcileEvery = -1
	})
	// The storm's credentials hold tokens of their own; the rest share
	// one, never refreshed.
	const creds, publishers = 1000, 20
	key := func(i int) events.Key { return fleet.MustKey(b, fmt.Sprintf("scale.user%d.api", i)) }
	var regP99, regMax time.Duration // of the last registration
	// register registers the first n credentials with 64 requesters; the
	// storm's get tokens of their own, whose fingerprints and version it
	// returns.
	register := func(n int) (fps []string, version int64) {
		fps = make([]string, min(n, creds))
		shared := bd.AS.Issue(fleet.ClientID)
		var mu sync.Mutex
		took := make([]time.Duration, 0, n)
		var wg sync.WaitGroup
		work := make(chan int, 1024)
		for range 64 {
			wg.Go(func() {
				for i := range work {
					tok := shared
					if i < creds {
						tok = bd.AS.Issue(fleet.ClientID)
					}
					t0 := time.Now()
					reply, err := bd.TryRegister(key(i), tok, func(r *events.RegisterRequest) { r.Token.ExpiresIn = 0 })
					if err != nil {
						b.Errorf("register %d: %v", i, err)
						continue
					}
					mu.Lock()
					took = append(took, time.Since(t0))
					if i < creds {
						fps[i], version = reply.Fingerprint, reply.Version
					}
					mu.Unlock()
				}
			})
		}
		for i := range n {
			work <- i
		}
		close(work)
		wg.Wait()
		slices.Sort(took)
		if len(took) > 0 {
			regP99, regMax = took[len(took)*99/100], took[len(took)-1]
		}
		return fps, version
	}

	start := time.Now()
	fps, version := register(n)
	b.Logf("registered %d credentials in %v (one request p99 %v, max %v)", n, time.Since(start).Round(time.Millisecond),
		regP99.Round(time.Millisecond), regMax.Round(time.Millisecond))
	regSeconds := time.Since(start).Seconds()
	runtime.GC()
	kvs, err := bd.JS.KeyValue(b.Context(), bd.Subj.CredentialsBucket())
	if err != nil {
		b.Fatal(err)
	}
	st, err := kvs.Status(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	kvPerCred, rss := float64(st.Bytes())/float64(n), float64(rssBytes(b))/(1<<20)

	var stormed time.Duration
	// b.Loop runs the function once (the registration above is not
	// repeated) and times the loop only.
	for i := 0; b.Loop(); i++ {
		if i > 0 {
			b.StopTimer()
			fps, version = register(creds)
			b.StartTimer()
		}
		// A storm among the first 1 000 keys, 20 runtimes each.
		rot := bd.WatchRotations(b, version+1, creds)
		t0 := time.Now()
		var pw sync.WaitGroup
		for p := range publishers {
			pw.Go(func() {
				for i := range creds {
					k := (i + p*creds/publishers) % creds
					bd.Publish401(b, key(k), fps[k], fmt.Sprint("rt-", p), true)
				}
			})
		}
		pw.Wait()
		select {
		case <-rot.Done:
		case <-time.After(2 * time.Minute):
			b.Fatalf("only %d of %d rotated within 2m", rot.Count(), creds)
		}
		stormed += time.Since(t0)
	}
	b.ReportMetric(float64(b.N*creds*publishers)/stormed.Seconds(), "events/s")
	b.ReportMetric(float64(b.N*creds)/stormed.Seconds(), "rotations/s")
	b.ReportMetric(float64(bd.AS.Reuses()), "reuses")
	b.ReportMetric(kvPerCred, "kv-bytes/cred")
	b.ReportMetric(regSeconds, "register-s")
	if rss > 0 {
		b.ReportMetric(rss, "rss-MiB")
	}
}

// rssBytes reads the resident set size of this process from /proc; 0 when
// it cannot (not Linux), and the benchmark then reports no rss-MiB.
func rssBytes(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Logf("no resident memory figure: %v", err)
		return 0
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		if f := bytes.Fields(line); len(f) >= 2 && string(f[0]) == "VmRSS:" {
			kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// scaleN is the number of credentials of the scale benchmarks:
// AUTHBUS_SCALE, 100 000 by default.
func scaleN(b *testing.B) int {
	n := 100_000
	if v := os.Getenv("AUTHBUS_SCALE"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1000 {
			b.Fatalf("AUTHBUS_SCALE=%q: want a number ≥ 1000", v)
		}
	}
	return n
}
