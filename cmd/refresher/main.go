// Command refresher is the authbus worker daemon. By default it starts an
// embedded NATS server with JetStream and runs the refresh pool and the token
// service on it; with --nats-url it joins an existing NATS deployment, where
// any number of refreshers may run side by side.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/embedded"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers"
)

func main() {
	err := dispatch(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, cli.ErrUsage):
		fmt.Fprintln(os.Stderr, "refresher:", err)
		os.Exit(2)
	}
	fmt.Fprintln(os.Stderr, "refresher:", err)
	os.Exit(1)
}

type options struct {
	conn                         cli.Conn
	listen, dataDir, sealKeyFile string
	sec                          securityOptions
	logFormat, logLevel          string
	metricsAddr                  string
	shutdownTimeout              time.Duration
	pool                         workers.Config
	ignored                      []string // settings from the environment this mode ignores, to log
}

// daemonUsage is the refresher's own help; its subcommands have theirs.
var daemonUsage = cli.Usage{
	Synopsis: `refresher [flags]
       refresher keys list|rotate|reseal|retire [flags]   (seal key rotation; see refresher keys --help)
       refresher permissions --tenant T | --refresher     (NATS user permissions; see refresher permissions --help)`,
	About: `
Runs authbus refresh workers and the auth.register/auth.token service. Without
--nats-url it starts an embedded NATS server with JetStream on --listen, with
its store and the seal key under --data-dir; with --nats-url it joins that
NATS deployment instead. --listen and --nats-config, which only the
embedded server has, are then refused (and logged as ignored when they come
from the environment), as are the TLS flags without --nats-url. Streams,
buckets and the consumer are created when missing; the seal key file only
once NATS is reachable. SIGINT/SIGTERM stop it gracefully.

Exit status: 0 stopped cleanly; 1 failed (the log says why); 2 bad flags.`,
	Groups: []cli.Group{cli.ConnGroup()},
}

// parseFlags parses the daemon's command line. --help prints the help to
// stdout and returns flag.ErrHelp; every other error is a usage error.
func parseFlags(args []string, stdout io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("refresher", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned, help goes to stdout
	env := cli.NewEnvFlags(fs)
	o.conn.Define(env, "", "join the NATS deployment at this URL instead of starting the embedded server")
	fs.StringVar(&o.listen, "listen", "127.0.0.1:4222", "client address of the embedded NATS server")
	env.Bind("listen", "AUTHBUS_LISTEN")
	fs.StringVar(&o.dataDir, "data-dir", "./authbus-data", "directory of the embedded server's store and of the default seal key file")
	env.Bind("data-dir", "AUTHBUS_DATA_DIR")
	fs.StringVar(&o.sealKeyFile, "seal-key-file", "", "key ring that seals refresh tokens and client secrets at rest, created (mode 0600) when missing once NATS is reachable; every refresher of a deployment needs the same file (default <data-dir>/seal-keys.json)")
	env.Bind("seal-key-file", "AUTHBUS_SEAL_KEY_FILE")
	bindSecurityFlags(fs, env, &o.sec)
	fs.StringVar(&o.pool.Prefix, "prefix", "", "subject prefix (default auth)")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	fs.IntVar(&o.pool.Workers, "workers", 0, "concurrent refreshes in this process (default 4×GOMAXPROCS, at least 8)")
	env.Bind("workers", "AUTHBUS_WORKERS")
	fs.DurationVar(&o.pool.TokenTimeout, "token-timeout", 0, "timeout of one token-endpoint call (default 30s)")
	env.Bind("token-timeout", "AUTHBUS_TOKEN_TIMEOUT")
	fs.DurationVar(&o.pool.LeaseTTL, "lease-ttl", 0, "refresh lease lifetime without renewal (default 2×token-timeout+5s)")
	env.Bind("lease-ttl", "AUTHBUS_LEASE_TTL")
	fs.DurationVar(&o.pool.RefreshLead, "refresh-lead", 0, "how long before expiry the proactive refresh is due (default 10% of the token lifetime, 30s–10m; never more than half of it)")
	env.Bind("refresh-lead", "AUTHBUS_REFRESH_LEAD")
	fs.DurationVar(&o.pool.DuplicateWindow, "duplicate-window", 0, "events stream de-duplication window (default 30s)")
	env.Bind("duplicate-window", "AUTHBUS_DUPLICATE_WINDOW")
	fs.IntVar(&o.pool.MaxDeliver, "max-deliver", 0, "deliveries of an event before it is terminated with a reason (default 20)")
	env.Bind("max-deliver", "AUTHBUS_MAX_DELIVER")
	fs.DurationVar(&o.pool.ReconcileEvery, "reconcile-every", 0, "how often to check that every active credential with an expiry has a pending proactive refresh, restoring missing ones (also a few seconds after start); negative turns it off (default 15m)")
	env.Bind("reconcile-every", "AUTHBUS_RECONCILE_EVERY")
	fs.IntVar(&o.pool.Replicas, "replicas", 0, "replicas of the streams and buckets this refresher creates (3 in a clustered deployment; 0 means 1); existing ones keep theirs")
	env.Bind("replicas", "AUTHBUS_REPLICAS")
	fs.Float64Var(&o.pool.TenantRate, "tenant-rate", 0, "new auth.401/auth.expiring events per second one tenant may report into the work lane; more go to the slow lane (default 100)")
	env.Bind("tenant-rate", "AUTHBUS_TENANT_RATE")
	fs.IntVar(&o.pool.TenantBurst, "tenant-burst", 0, "burst of --tenant-rate (default 200)")
	env.Bind("tenant-burst", "AUTHBUS_TENANT_BURST")
	fs.IntVar(&o.pool.TenantWorkers, "tenant-workers", 0, "refreshes one tenant may run at once in this process (default --workers less an eighth, at least one left for other tenants)")
	env.Bind("tenant-workers", "AUTHBUS_TENANT_WORKERS")
	fs.IntVar(&o.pool.MaxQueued, "max-queued", 0, "events that may wait in the work queue; beyond it new ones are refused (503) rather than fill the store (default 100000)")
	env.Bind("max-queued", "AUTHBUS_MAX_QUEUED")
	fs.StringVar(&o.pool.Instance, "instance", "", "name of this refresher in leases and logs (default hostname-pid)")
	env.Bind("instance", "AUTHBUS_INSTANCE")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 45*time.Second, "how long a graceful shutdown may take before in-flight work is abandoned")
	env.Bind("shutdown-timeout", "AUTHBUS_SHUTDOWN_TIMEOUT")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	env.Bind("log-format", "AUTHBUS_LOG_FORMAT")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	env.Bind("log-level", "AUTHBUS_LOG_LEVEL")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "127.0.0.1:9464", `listener of /metrics (Prometheus), /healthz and /readyz; "" disables it. Traces and OTLP metrics follow the OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_ENDPOINT, …); with none set nothing is exported`)
	env.BindEmpty("metrics-addr", "AUTHBUS_METRICS_ADDR")
	err := env.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		daemonUsage.Print(stdout, fs)
		return o, err
	}
	if err != nil {
		return o, cli.UsageErrorf("%v; see refresher --help", err)
	}
	if fs.NArg() > 0 {
		return o, cli.UsageErrorf("unexpected arguments %q; see refresher --help", fs.Args())
	}
	if err := o.conn.Check(); err != nil {
		return o, err
	}
	if o.ignored, err = embeddedOnly(env, o.conn, true); err != nil {
		return o, err
	}
	if o.sealKeyFile == "" {
		o.sealKeyFile = filepath.Join(o.dataDir, "seal-keys.json")
	}
	return o, nil
}

// embeddedOnly deals with the settings that one of the two modes would
// ignore: the embedded server's own when --nats-url joins a deployment
// instead, and (inProcess) the TLS settings when the refresher talks to its
// embedded server in process, where no TLS is spoken. One given on the
// command line is refused; one that only comes from a variable (exported
// for another refresher, or by a compose file) is not silently dropped
// either: the returned warnings say it is ignored.
func embeddedOnly(env *cli.EnvFlags, conn cli.Conn, inProcess bool) (warnings []string, err error) {
	check := func(name, why string) error {
		switch from := env.Origin(name); {
		case from == "":
		case strings.HasPrefix(from, "--"):
			return cli.UsageErrorf("%s %s: drop one of the two", from, why)
		default:
			warnings = append(warnings, fmt.Sprintf("%s is set but ignored: it %s", from, why))
		}
		return nil
	}
	if conn.URL != "" {
		why := "sets up the embedded NATS server, which " + env.Origin("nats-url") + " replaces by joining a deployment"
		for _, name := range []string{"listen", "nats-config"} {
			if err := check(name, why); err != nil {
				return nil, err
			}
		}
		return warnings, nil
	}
	if inProcess {
		for _, name := range cli.TLSFlags {
			if err := check(name, "applies with --nats-url only: the refresher reaches its embedded server in process, without TLS (configure the server's TLS for other clients with --nats-config)"); err != nil {
				return nil, err
			}
		}
	}
	return warnings, nil
}

func run(args []string, stdout, stderr io.Writer) error {
	start := time.Now()
	o, err := parseFlags(args, stdout)
	if err != nil {
		return err
	}
	log, err := telemetry.NewLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		return err
	}
	for _, w := range o.ignored {
		log.Warn(w)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal a second one kills the process at once.
	context.AfterFunc(ctx, stop)

	tel, shutdownTelemetry, err := telemetry.Setup(ctx, telemetry.Config{
		ServiceVersion: workers.Version,
		InstanceID:     o.pool.Instance,
		Prometheus:     o.metricsAddr != "",
		Logger:         log,
	})
	if err != nil {
		return err
	}
	// Deferred first, so it runs last: the spans of the final refreshes
	// and of the shutdown itself are flushed.
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := shutdownTelemetry(ctx); err != nil {
			log.Warn("flushing telemetry", "error", err)
		}
	}()
	o.pool.TracerProvider, o.pool.MeterProvider = tel.TracerProvider, tel.MeterProvider
	log.Info("telemetry", "traces_exported", tel.Tracing, "metrics_exporter", tel.MetricsExporter, "metrics_addr", o.metricsAddr)

	// An existing key file is checked now; a missing one is created only
	// once NATS is reachable, so that a refresher that cannot run leaves
	// nothing behind.
	ring, err := kv.LoadKeyRing(o.sealKeyFile)
	keyMissing := errors.Is(err, fs.ErrNotExist)
	if err != nil && !keyMissing {
		return err
	}
	o.pool.TokenHosts = o.sec.tokenHosts(o.conn.URL == "")
	o.pool.Logger = log

	url := o.conn.URL
	connOpts, err := o.conn.Options()
	if err != nil {
		return err
	}
	if url == "" {
		ns, err := embedded.Start(embedded.Config{Listen: o.listen, DataDir: o.dataDir, Logger: log, ConfigFile: o.sec.natsConfig})
		if err != nil {
			return err
		}
		defer func() {
			ns.Shutdown()
			ns.WaitForShutdown()
		}()
		connOpts = append(connOpts, nats.InProcessServer(ns))
		log.Info("embedded NATS server running", "client_url", ns.ClientURL(), "data_dir", o.dataDir)
	}
	connect := func(name string, extra ...nats.Option) (*nats.Conn, error) {
		nc, err := nats.Connect(url, append(append(slices.Clone(connOpts),
			nats.Name(name),
			nats.MaxReconnects(-1),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("NATS disconnected", "connection", name, "error", err) }),
			nats.ReconnectHandler(func(nc *nats.Conn) {
				log.Info("NATS reconnected", "connection", name, "url", nc.ConnectedUrlRedacted())
			}),
		), extra...)...)
		if err != nil {
			return nil, fmt.Errorf("connect to NATS %q as %s: %w; check --nats-url (NATS_URL), the credentials, or that the server is running", cli.RedactURLs(url), name, err)
		}
		return nc, nil
	}
	nc, err := connect("authbus-refresher")
	if err != nil {
		return err
	}
	defer nc.Close()
	if o.sec.natsServeUser != "" {
		// Serving runtimes on a connection of its own, as a user that may
		// only answer on inboxes: a request cannot make it write anything
		// else, whatever reply subject it names (docs/security.md).
		serve, err := connect("authbus-refresher-serve", nats.UserInfo(o.sec.natsServeUser, o.sec.natsServePasswd))
		if err != nil {
			return err
		}
		defer serve.Close()
		o.pool.ServeConn = serve
	}

	if keyMissing {
		var created bool
		if ring, created, err = kv.LoadOrCreateKeyRing(o.sealKeyFile); err != nil {
			return err
		}
		if created {
			log.Info("created seal key file", "path", o.sealKeyFile)
			if o.conn.URL != "" {
				log.Warn("created a new seal key while joining an existing deployment: every refresher must share the same key file, or none can read the others' credentials", "path", o.sealKeyFile)
			}
		}
	}
	o.pool.Seal = ring

	pool, err := newPool(ctx, nc, o.pool, log)
	if err != nil {
		return err
	}
	if o.metricsAddr != "" {
		ops, err := telemetry.StartOps(telemetry.OpsConfig{Addr: o.metricsAddr, Metrics: tel.MetricsHandler, Ready: pool.Ready, Logger: log})
		if err != nil {
			return err
		}
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := ops.Shutdown(ctx); err != nil {
				log.Warn("stopping the metrics listener", "error", err)
			}
		}()
		log.Info("metrics and health listener running", "addr", ops.Addr())
	}
	runErr := make(chan error, 1)
	go func() { runErr <- pool.Run(ctx) }()
	// Ready means serving: the service answers and the intake takes
	// reports in, so a runtime started on this line is not refused.
	select {
	case <-pool.Started():
		log.Info("refresher ready", "startup", time.Since(start).Round(time.Millisecond))
	case err := <-runErr:
		if err == nil {
			err = errors.New("the refresh pool stopped before it served")
		}
		return err
	}
	select {
	case err := <-runErr:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		log.Info("shutting down: finishing in-flight refreshes")
		select {
		case err := <-runErr:
			if err != nil {
				return err
			}
		case <-time.After(o.shutdownTimeout):
			return fmt.Errorf("shutdown took longer than %v; in-flight refreshes were abandoned (their leases expire by themselves)", o.shutdownTimeout)
		}
	}
	if o.pool.ServeConn != nil {
		if err := drain(o.pool.ServeConn, 10*time.Second); err != nil {
			log.Warn("draining the serving NATS connection", "error", err)
		}
	}
	if err := drain(nc, 10*time.Second); err != nil {
		log.Warn("draining the NATS connection", "error", err)
	}
	log.Info("refresher stopped")
	return nil
}

// startupPatience is how long a refresher waits for a JetStream that is
// not ready yet: a cluster whose nodes start together, as compose starts
// them, cannot place R3 streams until it has its peers.
const startupPatience = 2 * time.Minute

// newPool is workers.New, retried while JetStream is not ready yet.
func newPool(ctx context.Context, nc *nats.Conn, cfg workers.Config, log *slog.Logger) (*workers.Pool, error) {
	deadline := time.Now().Add(startupPatience)
	for {
		pool, err := workers.New(ctx, nc, cfg)
		if err == nil || !notReadyYet(err) || time.Now().After(deadline) {
			return pool, err
		}
		log.Warn("JetStream is not ready yet; trying again", "error", err, "gives_up_at", deadline.Format(time.RFC3339))
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return nil, err
		}
	}
}

// notReadyYet reports whether err is what a JetStream that is still
// starting answers: no peers to place a replicated stream on yet, the
// JetStream system temporarily unavailable (503), or no answer at all.
func notReadyYet(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode == jsClusterNoPeers || apiErr.Code == http.StatusServiceUnavailable
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders)
}

// jsClusterNoPeers is nats-server's "no suitable peers for placement".
const jsClusterNoPeers jetstream.ErrorCode = 10005

// drain flushes what the connection still has to send and closes it.
func drain(nc *nats.Conn, timeout time.Duration) error {
	closed := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := nc.Drain(); err != nil {
		return err
	}
	select {
	case <-closed:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("connection did not drain within %v", timeout)
	}
}
