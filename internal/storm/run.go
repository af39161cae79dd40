package storm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/embedded"
)

// runner is one mode's way of refreshing the storm's credentials.
type runner interface {
	// prepare registers the credentials, as logins would have.
	prepare(ctx context.Context) error
	// wave makes every runtime of every credential see a 401 for its
	// current token and returns when every credential is settled (has a
	// new token, or is lost), or ctx is done.
	wave(ctx context.Context, ws *waveState) error
	// probe refreshes credential i alone and returns the 401→new-token
	// latency and the token-endpoint call's own time (ok false when the
	// call was made in another process).
	probe(ctx context.Context, i int) (total, endpoint time.Duration, ok bool, err error)
	// drain makes one 401 per credential wait in the stream while the
	// refreshers are paused, then lets them work it off, and returns how
	// long that took.
	drain(ctx context.Context, ws *waveState) (time.Duration, error)
	close()
}

// Run runs the storm once per mode, one mode after the other, each against a
// fresh authorization server, and returns what each came to. It returns
// when every goroutine it started has ended.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	runID := hex.EncodeToString(b[:])

	rep := &Report{Credentials: cfg.Credentials, Runtimes: cfg.Runtimes, Waves: cfg.Waves,
		Processes: min(cfg.Processes, cfg.Runtimes), Pools: cfg.Pools, Workers: cfg.Workers,
		Endpoint: "built-in (authserver: rotating, reuse → " + reuseName(cfg) + fmt.Sprintf(", latency %v, %d×503 per wave)", cfg.Latency, cfg.Failures),
		NATS:     "embedded"}
	if cfg.TokenURL != "" {
		rep.Endpoint = cfg.TokenURL + " (client_credentials)"
	}
	if cfg.NATSURL != "" {
		rep.NATS = cli.RedactURLs(cfg.NATSURL) + " (its refreshers do the authbus refreshes)"
	}

	var env *natsEnv
	if cfg.has(ModeAuthbus) || cfg.has(ModeCeiling) {
		var err error
		if env, err = startNATS(cfg); err != nil {
			return nil, err
		}
		defer env.close()
	}
	for _, m := range cfg.Modes {
		res, err := runMode(ctx, cfg, env, m, runID)
		if err != nil {
			return rep, fmt.Errorf("storm %s: %w", m, err)
		}
		rep.Modes = append(rep.Modes, res)
	}
	if c, a := rep.Mode(ModeCeiling), rep.Mode(ModeAuthbus); c != nil && a != nil && c.BacklogRefreshesPerSec > 0 {
		a.OfCeiling = 100 * a.BacklogRefreshesPerSec / c.BacklogRefreshesPerSec
	}
	return rep, nil
}

func reuseName(cfg Config) string {
	return [...]string{"400 invalid_grant", "403 invalid_grant", "Dex 400 invalid_request", "invalid_grant + family revoked"}[cfg.Reuse]
}

func runMode(ctx context.Context, cfg Config, env *natsEnv, m Mode, runID string) (*ModeResult, error) {
	ep, err := newEndpoint(cfg)
	if err != nil {
		return nil, err
	}
	defer ep.close()
	var r runner
	switch m {
	case ModeNaive:
		r = newDirect(cfg, ep, runID, false)
	case ModeInProcess:
		r = newDirect(cfg, ep, runID, true)
	case ModeAuthbus:
		r = newAuthbus(cfg, ep, env, runID)
	case ModeCeiling:
		r = newCeiling(cfg, ep, env, runID)
	}
	defer r.close()

	fmt.Fprintf(cfg.Progress, "%s: registering %d credentials\n", m, cfg.Credentials)
	if err := r.prepare(ctx); err != nil {
		return nil, err
	}
	res := &ModeResult{Mode: m, Events: cfg.Credentials * cfg.Runtimes * cfg.Waves}
	bounds := []int{ep.calls()}
	var lats []time.Duration
	start := time.Now()
	for w := 1; w <= cfg.Waves; w++ {
		ep.newFailures()
		ws := newWave(cfg.Credentials, cfg.Credentials)
		err := withProgress(cfg, func() string {
			return fmt.Sprintf("%s wave %d/%d: %d/%d credentials settled, %d token calls",
				m, w, cfg.Waves, cfg.Credentials-int(ws.remaining.Load()), cfg.Credentials, ep.calls()-bounds[0])
		}, func() error {
			wctx, cancel := context.WithTimeout(ctx, cfg.WaveTimeout)
			defer cancel()
			return r.wave(wctx, ws)
		})
		if err != nil {
			return nil, fmt.Errorf("wave %d: %w", w, err)
		}
		bounds = append(bounds, ep.calls())
		lats = append(lats, ws.latencies()...)
		res.NeedsReauth += int(ws.needsReauth.Load())
		res.Failed += int(ws.failed.Load())
		res.Unrefreshed += ws.unrefreshed()
	}
	elapsed := time.Since(start)
	res.Seconds = elapsed.Seconds()
	res.Calls = bounds[len(bounds)-1] - bounds[0]
	res.CallsPerGeneration, res.PerGenerationExact = ep.perGeneration(cfg.Credentials, bounds)
	res.Reuses = ep.reuses()
	res.Latency = latencyOf(lats)
	res.EventsPerSec = float64(res.Events) / elapsed.Seconds()
	res.RefreshesPerSec = float64(cfg.Credentials*cfg.Waves) / elapsed.Seconds()
	times := ep.callTimes()
	res.PeakCallsPerSec = peakPerSecond(times[min(bounds[0], len(times)):min(bounds[len(bounds)-1], len(times))])

	if m == ModeAuthbus || m == ModeCeiling {
		fmt.Fprintf(cfg.Progress, "%s: backlog of %d events\n", m, cfg.Credentials)
		ws := newWave(cfg.Credentials, cfg.Credentials)
		wctx, cancel := context.WithTimeout(ctx, cfg.WaveTimeout)
		took, err := r.drain(wctx, ws)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("backlog: %w", err)
		}
		res.BacklogRefreshesPerSec = float64(cfg.Credentials) / took.Seconds()
	}
	if (m == ModeAuthbus || m == ModeCeiling) && cfg.Probes > 0 {
		var totals, added []time.Duration
		for j := range cfg.Probes {
			total, own, ok, err := r.probe(ctx, j%cfg.Credentials)
			if err != nil {
				return nil, fmt.Errorf("probe %d: %w", j, err)
			}
			totals = append(totals, total)
			if ok {
				added = append(added, max(0, total-own))
			}
		}
		l := latencyOf(totals)
		res.Probe = &l
		if len(added) == len(totals) {
			a := latencyOf(added)
			res.ProbeAdded = &a
		}
	}
	fmt.Fprintf(cfg.Progress, "%s: done in %.1fs: %d token calls, %d reuses\n", m, res.Seconds, res.Calls, res.Reuses)
	return res, nil
}

// withProgress runs f, reporting line() every second while it runs.
func withProgress(cfg Config, line func() string, f func() error) error {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintln(cfg.Progress, line())
			}
		}
	})
	defer wg.Wait()
	defer close(done)
	return f()
}

// waveState tracks one wave: when each credential's first 401 was seen and
// when it settled. Safe for concurrent use.
type waveState struct {
	first       []atomic.Int64 // unix nanoseconds of the first 401; 0 before
	done        []atomic.Int64 // unix nanoseconds of the new token; 0 before, -1 lost
	remaining   atomic.Int64
	all         chan struct{} // closed when remaining reaches 0
	needsReauth atomic.Int64
	failed      atomic.Int64
}

// newWave tracks k credentials, of which want must settle.
func newWave(k, want int) *waveState {
	ws := &waveState{first: make([]atomic.Int64, k), done: make([]atomic.Int64, k), all: make(chan struct{})}
	ws.remaining.Store(int64(want))
	return ws
}

// started records a 401 for credential i.
func (ws *waveState) started(i int) { ws.first[i].CompareAndSwap(0, time.Now().UnixNano()) }

// settle records that credential i has a new token (refreshed) or is lost;
// only the first call for i counts.
func (ws *waveState) settle(i int, refreshed bool) {
	v := int64(-1)
	if refreshed {
		v = time.Now().UnixNano()
	}
	if ws.done[i].CompareAndSwap(0, v) && ws.remaining.Add(-1) == 0 {
		close(ws.all)
	}
}

// wait waits until every credential settled.
func (ws *waveState) wait(ctx context.Context) error {
	select {
	case <-ws.all:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%d of %d credentials not settled: %w; raise --wave-timeout, or look at the refreshers' logs", ws.remaining.Load(), len(ws.first), context.Cause(ctx))
	}
}

func (ws *waveState) latencies() []time.Duration {
	var out []time.Duration
	for i := range ws.first {
		if f, d := ws.first[i].Load(), ws.done[i].Load(); f > 0 && d > 0 {
			out = append(out, time.Duration(max(0, d-f)))
		}
	}
	return out
}

func (ws *waveState) unrefreshed() int {
	n := 0
	for i := range ws.done {
		if ws.done[i].Load() <= 0 {
			n++
		}
	}
	return n
}

// natsEnv is the NATS deployment the authbus and ceiling modes use: an
// embedded server started for the storm, or an external one.
type natsEnv struct {
	srv  *server.Server // nil when external
	dir  string
	url  string
	opts []nats.Option // with url: authentication, TLS
	nc   *nats.Conn    // the runtimes' connection: publishes 401s, watches events
	js   jetstream.JetStream
}

func startNATS(cfg Config) (*natsEnv, error) {
	env := &natsEnv{url: cfg.NATSURL, opts: cfg.NATSOptions}
	if cfg.NATSURL == "" {
		dir, err := os.MkdirTemp("", "authbus-storm-")
		if err != nil {
			return nil, fmt.Errorf("storm: temporary store for the embedded NATS server: %w; check TMPDIR", err)
		}
		env.dir = dir
		if env.srv, err = embedded.Start(embedded.Config{Listen: "127.0.0.1:0", DataDir: dir}); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		env.url = env.srv.ClientURL()
	}
	var err error
	if env.nc, err = env.connect("runtimes"); err != nil {
		env.close()
		return nil, err
	}
	if env.js, err = jetstream.New(env.nc); err != nil {
		env.close()
		return nil, fmt.Errorf("storm: jetstream: %w", err)
	}
	return env, nil
}

// connect opens a connection of its own, as another process would.
func (env *natsEnv) connect(name string) (*nats.Conn, error) {
	opts := append([]nats.Option{nats.Name("authbus-storm-" + name), nats.MaxReconnects(-1)}, env.opts...)
	nc, err := nats.Connect(env.url, opts...)
	if err != nil {
		return nil, fmt.Errorf("storm: connect to NATS %s: %w; check --nats-url", cli.RedactURLs(env.url), err)
	}
	return nc, nil
}

func (env *natsEnv) external() bool { return env.srv == nil }

func (env *natsEnv) close() {
	if env.nc != nil {
		env.nc.Close()
	}
	if env.srv != nil {
		env.srv.Shutdown()
		env.srv.WaitForShutdown()
	}
	if env.dir != "" {
		os.RemoveAll(env.dir)
	}
}

// waitQuiet waits until a consumer has nothing pending or unacknowledged, so
// that the counts taken afterwards are final.
func waitQuiet(ctx context.Context, js jetstream.JetStream, stream, consumer string) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := js.Consumer(ctx, stream, consumer)
		if err == nil {
			var ci *jetstream.ConsumerInfo
			if ci, err = c.Info(ctx); err == nil && ci.NumPending == 0 && ci.NumAckPending == 0 {
				return nil
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return fmt.Errorf("consumer %s/%s still has work: %w", stream, consumer, errors.Join(context.Cause(ctx), err))
		}
	}
}

// userIndex is the credential index of a key's user part, "u<i>".
func userIndex(user string, k int) (int, bool) {
	if len(user) < 2 || user[0] != 'u' {
		return 0, false
	}
	i, err := strconv.Atoi(user[1:])
	return i, err == nil && i >= 0 && i < k
}
