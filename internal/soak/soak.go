// Package soak is the steady-fleet load test behind `publisher soak`: N
// credentials whose access tokens live T seconds, kept fresh by refreshers
// for D minutes while runtimes use the tokens against a protected resource
// server, with an optional outage of the authorization server and optional
// refresher restarts. Storms measure a burst; a soak measures what breaks a
// real fleet, which is time.
//
// Everything runs on loopback: an embedded NATS server, the development
// authorization server (internal/authserver: rotating refresh tokens,
// reuse detection), a resource server that asks it whether each bearer
// token is valid and answers 401 otherwise, the runtimes, and the
// refreshers: pools in this process, or refresher processes started from a
// binary, which can be killed with SIGKILL and started again.
//
// What it counts is what a fleet's users would notice: expired tokens
// handed out by auth.token, 401s seen by runtimes, refresh tokens presented
// twice, credentials sent back to a login, and schedules lost; and what it
// costs: token calls per generation, breaker probes during the outage, the
// refreshers' memory and CPU, and how late the proactive refreshes fire.
package soak

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authserver"
	"github.com/authbus/authbus/internal/embedded"
	"github.com/authbus/authbus/kv"
)

// Config configures a soak. Zero values mean the documented defaults.
type Config struct {
	// Credentials is N; 0 means 1000.
	Credentials int
	// Lifetime is T, the lifetime of every access token the authorization
	// server issues; 0 means 60s. At registration each credential's token
	// is given a lifetime of its own between T/4 and T, so that the first
	// generations do not all expire together.
	Lifetime time.Duration
	// Duration is D, how long the runtimes use their tokens after the
	// credentials are registered; 0 means 2m.
	Duration time.Duration
	// UseEvery is how often each credential's runtime uses its token (asks
	// auth.token, then calls the resource server with it); 0 means T/4.
	UseEvery time.Duration
	// MaxUses caps the uses per second of all runtimes together, so that a
	// large N does not drown the machine in runtime traffic; 0 means 2000.
	MaxUses int

	// Refreshers is how many refreshers run; 0 means 2.
	Refreshers int
	// Workers is the concurrency of each refresher; 0 means the
	// refresher's default.
	Workers int
	// RefreshLead is passed to the refreshers (--refresh-lead); 0 means
	// their default (10 % of the lifetime, 30s–10m, at most half of it).
	RefreshLead time.Duration
	// Refresher is the path of a refresher binary (cmd/refresher). With
	// one, each refresher is a process of its own that joins the soak's
	// NATS server, is killed with SIGKILL and started again at KillAt, and
	// has its memory and CPU measured alone. Without one, the refreshers
	// are pools in this process, a kill closes a pool's connection
	// abruptly, and memory and CPU are the whole process's.
	Refresher string
	// RefresherArgs are more flags for each refresher process, after the
	// soak's own (a later flag wins), e.g. --reconcile-every 1m.
	RefresherArgs []string

	// OutageAt and OutageFor take the authorization server's token
	// endpoint down (connections closed unanswered) from OutageAt after
	// the start for OutageFor; 0 OutageFor means no outage.
	OutageAt, OutageFor time.Duration
	// KillAt are times after the start when the first refresher is killed
	// and started again at once.
	KillAt []time.Duration

	// NATSSync is how often the soak's NATS server syncs its store to
	// disk: 0 means on every write, as the refresher's embedded server and
	// deploy/nats do (acknowledged means on disk); a duration means every
	// that long, nats-server's own default being 2m.
	NATSSync time.Duration

	// Prefix is the subject prefix; "" means "auth".
	Prefix string
	// Progress receives a line every ProgressEvery (0 means 10s) and at
	// each phase; nil means none.
	Progress      io.Writer
	ProgressEvery time.Duration
	// Log receives what the refreshers log at warning level or above; nil
	// discards it.
	Log io.Writer
}

func (c Config) withDefaults() Config {
	if c.Credentials == 0 {
		c.Credentials = 1000
	}
	if c.Lifetime == 0 {
		c.Lifetime = time.Minute
	}
	if c.Duration == 0 {
		c.Duration = 2 * time.Minute
	}
	if c.UseEvery == 0 {
		c.UseEvery = c.Lifetime / 4
	}
	if c.MaxUses == 0 {
		c.MaxUses = 2000
	}
	if c.Refreshers == 0 {
		c.Refreshers = 2
	}
	if c.Prefix == "" {
		c.Prefix = "auth"
	}
	if c.ProgressEvery == 0 {
		c.ProgressEvery = 10 * time.Second
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
	return c
}

func (c Config) validate() error {
	var errs []error
	if c.Credentials < 1 {
		errs = append(errs, fmt.Errorf("Credentials (--credentials) is %d: set at least 1", c.Credentials))
	}
	if c.Lifetime < 4*time.Second || c.Lifetime%time.Second != 0 {
		errs = append(errs, fmt.Errorf("Lifetime (--lifetime) is %v: set whole seconds, at least 4s (expires_in is in seconds, schedules fire on whole seconds)", c.Lifetime))
	}
	if c.Duration <= 0 {
		errs = append(errs, fmt.Errorf("Duration (--duration) is %v: set a positive duration", c.Duration))
	}
	if c.UseEvery <= 0 || c.MaxUses < 1 {
		errs = append(errs, fmt.Errorf("UseEvery (--use-every) %v and MaxUses (--max-uses) %d: set both positive", c.UseEvery, c.MaxUses))
	}
	if c.Refreshers < 1 || c.Workers < 0 {
		errs = append(errs, fmt.Errorf("Refreshers (--refreshers) %d and Workers (--workers) %d: set at least one refresher, and workers 0 (default) or more", c.Refreshers, c.Workers))
	}
	if c.NATSSync < 0 {
		errs = append(errs, fmt.Errorf("NATSSync (--nats-sync) is %v: set 0 (sync on every write) or a positive interval", c.NATSSync))
	}
	if c.OutageFor < 0 || c.OutageAt < 0 || c.OutageFor > 0 && c.OutageAt+c.OutageFor > c.Duration {
		errs = append(errs, fmt.Errorf("outage from %v for %v: it must fit within the duration %v (--outage-at, --outage-for)", c.OutageAt, c.OutageFor, c.Duration))
	}
	for _, k := range c.KillAt {
		if k <= 0 || k >= c.Duration {
			errs = append(errs, fmt.Errorf("kill at %v: it must fall within the duration %v (--kill-at)", k, c.Duration))
		}
	}
	if c.Refresher != "" {
		if st, err := os.Stat(c.Refresher); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			errs = append(errs, fmt.Errorf("refresher binary %q (--refresher) is not an executable file; build one with: go build -o /tmp/refresher ./cmd/refresher", c.Refresher))
		}
	}
	if _, err := events.NewSubjects(c.Prefix); err != nil {
		errs = append(errs, fmt.Errorf("Prefix (--prefix): %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return nil
}

// ErrInvalidConfig wraps what is wrong with a Config; the message says
// which setting, and its flag.
var ErrInvalidConfig = errors.New("soak config")

// phase is a part of the soak the counts are split by.
type phase int

const (
	phaseSteady phase = iota // before the outage (or all of it, without one)
	phaseOutage              // while the token endpoint is down
	phaseAfter               // after it is back
	phases
)

var phaseNames = [phases]string{"before the outage", "during the outage", "after the outage"}

// soak is one run: the deployment, the runtimes and what they counted.
type soak struct {
	cfg  Config
	run  string // the tenant of this run's credentials
	dir  string
	subj events.Subjects
	keys []events.Key
	// startNs is when the runtimes started (Unix nanoseconds; 0 during
	// set-up): read by NATS and HTTP callbacks, hence atomic.
	startNs atomic.Int64

	srv  *embeddedServer
	as   *authserver.Server
	rs   *resourceServer
	nc   *nats.Conn
	js   jetstream.JetStream
	ring *kv.KeyRing

	refreshers []*slot
	stats      *counters
	self       usage // this process's, when the runtimes started

	progressMu sync.Mutex // Config.Progress need not be safe for concurrent writes; the ticker and the killer both write
}

// Run runs one soak and returns what it came to. It returns when every
// process and goroutine it started has ended; cancelling ctx ends the soak
// early with the counts so far.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	s := &soak{cfg: cfg, run: "soak-" + hex.EncodeToString(b[:]), stats: newCounters(cfg.Credentials)}
	s.subj, _ = events.NewSubjects(cfg.Prefix)
	s.keys = make([]events.Key, cfg.Credentials)
	for i := range s.keys {
		s.keys[i] = events.Key{Tenant: s.run, User: fmt.Sprintf("u%d", i), Server: "api"}
	}
	defer s.close()
	if err := s.setUp(ctx); err != nil {
		return nil, err
	}
	s.progress("registering %d credentials (tokens of %v, registered with %v–%v left)", cfg.Credentials, cfg.Lifetime, cfg.Lifetime/4, cfg.Lifetime)
	regStart := time.Now()
	if err := s.register(ctx); err != nil {
		return nil, err
	}
	registered := time.Since(regStart)
	s.progress("registered in %v; the runtimes use their tokens for %v", registered.Round(time.Millisecond), cfg.Duration)
	s.drive(ctx)
	rep := s.report(ctx)
	rep.Registration = registered.Seconds()
	return rep, nil
}

// setUp starts the NATS server, the authorization and resource servers,
// the runtimes' connection and the refreshers.
func (s *soak) setUp(ctx context.Context) error {
	var err error
	if s.dir, err = os.MkdirTemp("", "authbus-soak-"); err != nil {
		return fmt.Errorf("soak: temporary folder: %w; check TMPDIR", err)
	}
	keyFile := filepath.Join(s.dir, "seal-keys.json")
	if s.ring, _, err = kv.LoadOrCreateKeyRing(keyFile); err != nil {
		return err
	}
	if s.srv, err = startNATS(s.dir, s.cfg.NATSSync); err != nil {
		return err
	}
	if s.as, err = authserver.Start("127.0.0.1:0"); err != nil {
		return fmt.Errorf("soak: authorization server: %w", err)
	}
	s.as.SetExpiresIn(int64(s.cfg.Lifetime / time.Second))
	for i := range s.keys {
		s.as.AddClient(clientID(i), clientSecret(i))
	}
	s.as.OnCall(s.stats.onCall(s.since))
	if s.rs, err = startResourceServer(s.as); err != nil {
		return err
	}
	if s.nc, err = nats.Connect(s.srv.url, nats.Name("authbus-soak-runtimes"), nats.MaxReconnects(-1)); err != nil {
		return fmt.Errorf("soak: connect to the embedded NATS server: %w", err)
	}
	if s.js, err = jetstream.New(s.nc); err != nil {
		return fmt.Errorf("soak: jetstream: %w", err)
	}
	if err := s.watch(); err != nil {
		return err
	}
	for i := range s.cfg.Refreshers {
		sl := &slot{s: s, name: fmt.Sprintf("refresher-%d", i), keyFile: keyFile}
		s.refreshers = append(s.refreshers, sl)
		if err := sl.start(ctx); err != nil {
			return err
		}
	}
	return s.waitForService(ctx)
}

// since is the time since the runtimes started, and the phase it falls in.
func (s *soak) since(t time.Time) (time.Duration, phase) {
	start, ok := s.started()
	if !ok {
		return 0, phaseSteady
	}
	d := t.Sub(start)
	switch {
	case s.cfg.OutageFor == 0 || d < s.cfg.OutageAt:
		return d, phaseSteady
	case d < s.cfg.OutageAt+s.cfg.OutageFor:
		return d, phaseOutage
	}
	return d, phaseAfter
}

// started returns when the runtimes started, and whether they have.
func (s *soak) started() (time.Time, bool) {
	ns := s.startNs.Load()
	return time.Unix(0, ns), ns != 0
}

// waitForService waits until a refresher answers on auth.token.
func (s *soak) waitForService(ctx context.Context) error {
	probe := s.subj.Token(events.Key{Tenant: s.run, User: "probe", Server: "probe"})
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := s.nc.Request(probe, nil, time.Second)
		if !errors.Is(err, nats.ErrNoResponders) {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("soak: no refresher answered on auth.token within 30s; see the refreshers' log (--log)")
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// drive runs the soak's clock: the runtimes, the outage, the kills and the
// progress lines, until Duration has passed or ctx ends.
func (s *soak) drive(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Duration)
	defer cancel()
	for _, r := range s.refreshers {
		r.markStart()
	}
	s.self = selfUsage()
	s.stats.markStart()
	s.startNs.Store(time.Now().UnixNano())
	var wg sync.WaitGroup
	wg.Go(func() { s.use(ctx) })
	at := func(d time.Duration, f func()) {
		wg.Go(func() {
			t := time.NewTimer(d)
			defer t.Stop()
			select {
			case <-t.C:
				f()
			case <-ctx.Done():
			}
		})
	}
	if s.cfg.OutageFor > 0 {
		at(s.cfg.OutageAt, func() {
			s.as.SetDown(true)
			s.progress("the token endpoint is down for %v", s.cfg.OutageFor)
		})
		at(s.cfg.OutageAt+s.cfg.OutageFor, func() {
			s.as.SetDown(false)
			s.progress("the token endpoint is back")
		})
	}
	for _, k := range s.cfg.KillAt {
		at(k, func() {
			if err := s.refreshers[0].kill(ctx); err != nil {
				s.progress("kill: %v", err)
			}
		})
	}
	wg.Go(func() {
		t := time.NewTicker(s.cfg.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				d, _ := s.since(time.Now())
				s.progress("%s", s.stats.line(d, s.cfg.Duration))
			case <-ctx.Done():
				return
			}
		}
	})
	wg.Wait()
	// An outage that outlasted a cancelled soak must not outlast the soak.
	s.as.SetDown(false)
}

func (s *soak) progress(format string, args ...any) {
	prefix := "soak: "
	if start, ok := s.started(); ok {
		prefix = fmt.Sprintf("soak %v: ", time.Since(start).Round(time.Second))
	}
	s.progressMu.Lock()
	defer s.progressMu.Unlock()
	fmt.Fprintf(s.cfg.Progress, prefix+format+"\n", args...)
}

// close stops everything that was started, in the reverse order.
func (s *soak) close() {
	for _, r := range s.refreshers {
		r.stop()
	}
	if s.nc != nil {
		s.nc.Close()
	}
	if s.rs != nil {
		s.rs.close()
	}
	if s.as != nil {
		s.as.Close()
	}
	if s.srv != nil {
		s.srv.close()
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// embeddedServer is the soak's NATS server.
type embeddedServer struct {
	stop func()
	url  string
}

func startNATS(dir string, sync time.Duration) (*embeddedServer, error) {
	cfg := embedded.Config{Listen: "127.0.0.1:0", DataDir: dir}
	if sync > 0 {
		// The embedded server syncs on every write unless its
		// configuration file sets an interval.
		cfg.ConfigFile = filepath.Join(dir, "nats.conf")
		conf := fmt.Sprintf("jetstream { sync_interval: %q }\n", sync.String())
		if err := os.WriteFile(cfg.ConfigFile, []byte(conf), 0o600); err != nil {
			return nil, fmt.Errorf("soak: NATS configuration: %w", err)
		}
	}
	srv, err := embedded.Start(cfg)
	if err != nil {
		return nil, err
	}
	return &embeddedServer{url: srv.ClientURL(), stop: func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}}, nil
}

func (e *embeddedServer) close() { e.stop() }

// clientID and clientSecret name credential i's OAuth client at the
// authorization server: one per credential, so that the server's call log
// says which credential each call was for, whichever refresher made it.
func clientID(i int) string     { return fmt.Sprintf("soak-c%d", i) }
func clientSecret(i int) string { return fmt.Sprintf("soak-secret-%d", i) }
