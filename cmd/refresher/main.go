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
	"log/slog"
	"net/http"
	neturl "net/url"
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
	if err := dispatch(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "refresher:", err)
		os.Exit(1)
	}
}

type options struct {
	natsURL, listen, dataDir, sealKeyFile string
	sec                                   securityOptions
	logFormat, logLevel                   string
	metricsAddr                           string
	shutdownTimeout                       time.Duration
	pool                                  workers.Config
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("refresher", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: refresher [flags]
       refresher keys list|rotate|reseal|retire [flags]   (seal key rotation; see refresher keys --help)
       refresher permissions --tenant T | --refresher     (NATS user permissions for nats-server)

Runs authbus refresh workers and the auth.register/auth.token service. Without
--nats-url it starts an embedded NATS server with JetStream on --listen, with
its store and the seal key under --data-dir. Streams, buckets and the consumer
are created when missing. SIGINT/SIGTERM stop it gracefully.

Flags (each also read from the environment variable shown):
`)
		fs.PrintDefaults()
	}
	env := cli.NewEnvFlags(fs)
	fs.StringVar(&o.natsURL, "nats-url", "", "join this NATS deployment instead of starting the embedded server")
	env.Bind("nats-url", "NATS_URL")
	fs.StringVar(&o.listen, "listen", "127.0.0.1:4222", "client address of the embedded NATS server")
	env.Bind("listen", "AUTHBUS_LISTEN")
	fs.StringVar(&o.dataDir, "data-dir", "./authbus-data", "directory of the embedded server's store and of the default seal key file")
	env.Bind("data-dir", "AUTHBUS_DATA_DIR")
	fs.StringVar(&o.sealKeyFile, "seal-key-file", "", "key ring that seals refresh tokens and client secrets at rest, created (mode 0600) when missing; every refresher of a deployment needs the same file (default <data-dir>/seal-keys.json)")
	env.Bind("seal-key-file", "AUTHBUS_SEAL_KEY_FILE")
	bindSecurityFlags(fs, env, &o.sec)
	fs.StringVar(&o.pool.Prefix, "prefix", "auth", "subject prefix")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	fs.IntVar(&o.pool.Workers, "workers", 0, "concurrent refreshes in this process (default 4×GOMAXPROCS, at least 8)")
	env.Bind("workers", "AUTHBUS_WORKERS")
	fs.DurationVar(&o.pool.TokenTimeout, "token-timeout", 30*time.Second, "timeout of one token-endpoint call")
	env.Bind("token-timeout", "AUTHBUS_TOKEN_TIMEOUT")
	fs.DurationVar(&o.pool.LeaseTTL, "lease-ttl", 0, "refresh lease lifetime without renewal (default 2×token-timeout+5s)")
	env.Bind("lease-ttl", "AUTHBUS_LEASE_TTL")
	fs.DurationVar(&o.pool.RefreshLead, "refresh-lead", 0, "how long before expiry the proactive refresh is due (default 10% of the token lifetime, 30s–10m; never more than half of it)")
	env.Bind("refresh-lead", "AUTHBUS_REFRESH_LEAD")
	fs.DurationVar(&o.pool.DuplicateWindow, "duplicate-window", 30*time.Second, "events stream de-duplication window")
	env.Bind("duplicate-window", "AUTHBUS_DUPLICATE_WINDOW")
	fs.IntVar(&o.pool.MaxDeliver, "max-deliver", 20, "deliveries of an event before it is terminated with a reason")
	env.Bind("max-deliver", "AUTHBUS_MAX_DELIVER")
	fs.IntVar(&o.pool.Replicas, "replicas", 0, "replicas of the streams and buckets this refresher creates (3 in a clustered deployment; 0 means 1); existing ones keep theirs")
	env.Bind("replicas", "AUTHBUS_REPLICAS")
	fs.Float64Var(&o.pool.TenantRate, "tenant-rate", 100, "new auth.401/auth.expiring events per second one tenant may report into the work lane (more go to the slow lane)")
	env.Bind("tenant-rate", "AUTHBUS_TENANT_RATE")
	fs.IntVar(&o.pool.TenantBurst, "tenant-burst", 200, "burst of --tenant-rate")
	env.Bind("tenant-burst", "AUTHBUS_TENANT_BURST")
	fs.IntVar(&o.pool.TenantWorkers, "tenant-workers", 0, "refreshes one tenant may run at once in this process (default --workers less an eighth, at least one left for other tenants)")
	env.Bind("tenant-workers", "AUTHBUS_TENANT_WORKERS")
	fs.IntVar(&o.pool.MaxQueued, "max-queued", 100_000, "events that may wait in the work queue; beyond it new ones are refused (503) rather than fill the store")
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
	if err := env.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q; see refresher --help", fs.Args())
	}
	if o.sealKeyFile == "" {
		o.sealKeyFile = filepath.Join(o.dataDir, "seal-keys.json")
	}
	return o, nil
}

func run(args []string, stderr io.Writer) error {
	start := time.Now()
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	log, err := telemetry.NewLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		return err
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

	ring, created, err := kv.LoadOrCreateKeyRing(o.sealKeyFile)
	if err != nil {
		return err
	}
	if created {
		log.Info("created seal key file", "path", o.sealKeyFile)
		if o.natsURL != "" {
			log.Warn("created a new seal key while joining an existing deployment: every refresher must share the same key file, or none can read the others' credentials", "path", o.sealKeyFile)
		}
	}
	o.pool.Seal = ring
	o.pool.TokenHosts = o.sec.tokenHosts(o.natsURL == "")
	o.pool.Logger = log

	url := o.natsURL
	var connOpts []nats.Option
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
	connect := func(name string, auth nats.Option) (*nats.Conn, error) {
		nc, err := nats.Connect(url, append(slices.Clone(connOpts),
			nats.Name(name),
			auth,
			nats.MaxReconnects(-1),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("NATS disconnected", "connection", name, "error", err) }),
			nats.ReconnectHandler(func(nc *nats.Conn) {
				log.Info("NATS reconnected", "connection", name, "url", nc.ConnectedUrlRedacted())
			}),
		)...)
		if err != nil {
			return nil, fmt.Errorf("connect to NATS %q as %s: %w; check --nats-url, the user and password, or that the server is running", redactURLs(url), name, err)
		}
		return nc, nil
	}
	nc, err := connect("authbus-refresher", o.sec.natsAuth())
	if err != nil {
		return err
	}
	defer nc.Close()
	if o.sec.natsServeUser != "" {
		// Serving runtimes on a connection of its own, as a user that may
		// only answer on inboxes: a request cannot make it write anything
		// else, whatever reply subject it names (docs/security.md).
		serve, err := connect("authbus-refresher-serve", o.sec.natsServeAuth())
		if err != nil {
			return err
		}
		defer serve.Close()
		o.pool.ServeConn = serve
	}

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
	log.Info("refresher ready", "startup", time.Since(start).Round(time.Millisecond))
	runErr := make(chan error, 1)
	go func() { runErr <- pool.Run(ctx) }()
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

// redactURLs hides the passwords of a comma-separated NATS server list, so
// that an error or log line never carries them.
func redactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, s := range parts {
		if u, err := neturl.Parse(strings.TrimSpace(s)); err == nil {
			parts[i] = u.Redacted()
		} else {
			parts[i] = "(unparsable URL)"
		}
	}
	return strings.Join(parts, ",")
}
