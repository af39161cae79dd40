package workers

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"time"

	"github.com/nats-io/nats.go"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers/discovery"
	"github.com/authbus/authbus/workers/egress"
)

// Config configures a Pool. Zero values mean the documented defaults.
type Config struct {
	// Prefix is the subject prefix; "" means "auth".
	Prefix string
	// Workers is the number of concurrent refreshes in this process; 0 means
	// 4×GOMAXPROCS, at least 8 (the work is network-bound).
	Workers int
	// TokenTimeout bounds one token-endpoint call; 0 means 30s. It is
	// generous on purpose: a lost answer from a server that revokes on reuse
	// can cost the user a re-login, since the retry must send the same
	// refresh token.
	TokenTimeout time.Duration
	// LeaseTTL is how long a refresh lease lives without renewal; 0 means
	// 2×TokenTimeout+5s. It must exceed TokenTimeout… unless the refresh
	// renews, which it does every LeaseTTL/3.
	LeaseTTL time.Duration
	// DuplicateWindow is the events stream's de-duplication window; 0 means 30s.
	DuplicateWindow time.Duration
	// AckWait is how long the work and slow lanes wait for an ack before
	// they deliver an event again; 0 means 30s. The due lane (fired
	// proactive refreshes) waits at most 5s (see dueAckWait). Events held
	// in this process, and refreshes under way, report progress every third
	// of the shorter of the two.
	AckWait time.Duration
	// MaxDeliver is how often an event is delivered before it is terminated
	// with a reason; 0 means 20.
	MaxDeliver int
	// RetryBase and RetryMax bound the exponential backoff after a transient
	// failure; 0 means 1s and 1m.
	RetryBase, RetryMax time.Duration
	// LeaseWait is the redelivery delay of an event whose credential is being
	// refreshed by another worker; 0 means 1s. By then the event is usually
	// stale and costs no call.
	LeaseWait time.Duration
	// BreakerFailures is the number of consecutive transient failures of a
	// client (tenant and client_id) at a token endpoint that opens the
	// client's breaker, and of failures that never reached the endpoint
	// that opens the endpoint's; 0 means 5. See breakers for the rule that
	// keeps one tenant's failing client from stopping another tenant.
	BreakerFailures uint32
	// BreakerOpenFor is how long an open breaker refuses calls before letting
	// one through; 0 means 30s.
	BreakerOpenFor time.Duration
	// RefreshLead is how long before expiry the proactive refresh is due; 0
	// means the rule of docs/protocol.md: 10 % of the token's lifetime, clamped to
	// 30s–10m. Either way it is never more than half the lifetime. Each
	// schedule fires at a random point of the first half of the lead, so
	// credentials registered together do not all refresh in the same second.
	RefreshLead time.Duration
	// ReconcileEvery is how often the pool checks that every active
	// credential with an expiry has a pending proactive refresh and
	// restores those that have none (see Pool.Reconcile); the first check
	// runs a few seconds after Run starts. 0 means 15m; negative turns the
	// checks off.
	ReconcileEvery time.Duration
	// Replicas of the streams and buckets this pool creates; 0 means 1.
	// Streams and buckets that exist keep the replica count they have: a
	// refresher never changes a deployment's, and logs a warning when a
	// non-zero Replicas differs from it.
	Replicas int
	// replicasSet records that Replicas was given, not defaulted.
	replicasSet bool
	// TenantRate is how many new auth.401 and auth.expiring events (not
	// duplicates) the intake of this process takes in per second from one
	// tenant, with a burst of TenantBurst; more are refused with 429. 0
	// means 100 per second, and 200 for the burst. It bounds what one
	// tenant's flood can put in front of another tenant's events, and what
	// it can put into the store.
	TenantRate  float64
	TenantBurst int
	// TenantWorkers is how many of this process's refreshes one tenant may
	// run at once: a tenant whose token endpoint hangs holds no more, and
	// the rest of the workers stay free for the other tenants. Its further
	// events wait in the process, without a worker. 0 means Workers less an
	// eighth of them (at least one left for the others).
	TenantWorkers int
	// MaxQueued bounds the events waiting in the stream for a refresher:
	// beyond it the intake refuses new ones (503) rather than let them fill
	// the store. The stream itself cannot be bounded (JetStream refuses
	// discard-new on a stream with schedules, and discard-old would drop
	// schedules), so the intake checks the consumer's pending count, at
	// most a second old. 0 means 100 000.
	MaxQueued int
	// ServeConn, when set, is the connection that serves runtimes: the
	// auth.register and auth.token service and the intake of auth.401 and
	// auth.expiring. Give it a NATS user that may answer on inboxes only,
	// and the Pool's own connection the user that writes JetStream, so
	// that a request cannot make the serving side write anything else (see
	// docs/security.md). nil means the Pool's connection serves too.
	ServeConn *nats.Conn
	// Instance names this process in leases and logs; "" means hostname-pid.
	Instance string
	// Source is the CloudEvents source of events this pool publishes; ""
	// means "authbus/refresher/<Instance>".
	Source string
	// Seal encrypts refresh tokens and client secrets at rest. Required.
	Seal *kv.KeyRing
	// TokenHosts restricts which token endpoints may be registered and
	// called; the zero value allows public addresses only. It is enforced
	// at registration and, in the default HTTPClient, on every connection.
	TokenHosts egress.Policy
	// HTTPClient calls token endpoints; nil means TokenHosts.Client, which
	// enforces TokenHosts on every connection, follows no redirect and
	// keeps an idle connection per worker per host. A client given here
	// brings its own dialer; TokenHosts is then checked at registration
	// only.
	HTTPClient *http.Client
	// Requests is how many auth.register, and separately how many
	// auth.token, requests this process serves at once; 0 means 64. A
	// tenant is served at most a quarter of them at once, and may have
	// more waiting (twice as many registrations, 64 times as many token
	// requests, which are quick); a request beyond that is answered 503
	// unavailable, retry. So one tenant's slow issuers cannot hold up
	// another tenant's registration.
	Requests int
	// Discovery finds token endpoints of registrations that name an issuer
	// (RFC 8414) and caches them; nil means one per pool that fetches with
	// HTTPClient, caches for an hour and gives up after 5s. Pools of one
	// process may share one.
	Discovery *discovery.Resolver
	// Logger receives the pool's logs; nil means slog.Default().
	Logger *slog.Logger
	// TracerProvider makes the pool's spans (process, lease claim, token
	// endpoint call, store, publish); nil means otel.GetTracerProvider().
	TracerProvider trace.TracerProvider
	// MeterProvider makes the pool's metrics; nil means
	// otel.GetMeterProvider().
	MeterProvider metric.MeterProvider
}

// withDefaults returns a copy of c with zero values replaced by defaults.
func (c Config) withDefaults() Config {
	if c.Prefix == "" {
		c.Prefix = "auth"
	}
	if c.Workers == 0 {
		c.Workers = max(8, 4*runtime.GOMAXPROCS(0))
	}
	if c.TokenTimeout == 0 {
		c.TokenTimeout = 30 * time.Second
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 2*c.TokenTimeout + 5*time.Second
	}
	if c.DuplicateWindow == 0 {
		c.DuplicateWindow = 30 * time.Second
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.MaxDeliver == 0 {
		c.MaxDeliver = 20
	}
	if c.RetryBase == 0 {
		c.RetryBase = time.Second
	}
	if c.RetryMax == 0 {
		c.RetryMax = time.Minute
	}
	if c.LeaseWait == 0 {
		c.LeaseWait = time.Second
	}
	if c.BreakerFailures == 0 {
		c.BreakerFailures = 5
	}
	if c.BreakerOpenFor == 0 {
		c.BreakerOpenFor = 30 * time.Second
	}
	if c.TenantRate == 0 {
		c.TenantRate = 100
	}
	if c.TenantBurst == 0 {
		c.TenantBurst = 200
	}
	if c.TenantWorkers == 0 {
		c.TenantWorkers = max(1, c.Workers-max(1, c.Workers/8))
	}
	if c.MaxQueued == 0 {
		c.MaxQueued = 100_000
	}
	if c.Requests == 0 {
		c.Requests = 64
	}
	if c.ReconcileEvery == 0 {
		c.ReconcileEvery = 15 * time.Minute
	}
	c.replicasSet = c.Replicas != 0
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.Instance == "" {
		host, _ := os.Hostname()
		c.Instance = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if c.Source == "" {
		c.Source = "authbus/refresher/" + c.Instance
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.TracerProvider == nil {
		c.TracerProvider = otel.GetTracerProvider()
	}
	if c.MeterProvider == nil {
		c.MeterProvider = otel.GetMeterProvider()
	}
	if c.HTTPClient == nil {
		// An idle connection per worker per host: with
		// http.DefaultClient's two, most token calls under load open a new
		// connection (measured: 20–40 % less throughput).
		c.HTTPClient = c.TokenHosts.Client(c.Workers, c.Logger)
	}
	if c.Discovery == nil {
		hosts := c.TokenHosts
		c.Discovery = discovery.NewResolver(discovery.Config{HTTPClient: c.HTTPClient, Hosts: &hosts})
	}
	return c
}

// validate reports every problem of a defaulted config at once.
func (c Config) validate() error {
	var errs []error
	if c.Seal == nil {
		errs = append(errs, errors.New("Seal is nil: load a key ring with kv.LoadOrCreateKeyRing"))
	}
	if c.Workers < 1 {
		errs = append(errs, fmt.Errorf("Workers is %d: set at least 1", c.Workers))
	}
	if c.LeaseTTL < 2*time.Second {
		errs = append(errs, fmt.Errorf("LeaseTTL is %v: set at least 2s (KV key TTLs have 1s granularity)", c.LeaseTTL))
	}
	if c.TokenTimeout < 0 || c.AckWait < 3*time.Millisecond || c.RetryBase < 0 || c.RetryMax < c.RetryBase {
		errs = append(errs, fmt.Errorf("timeouts: TokenTimeout %v, AckWait %v, RetryBase %v, RetryMax %v must be positive with RetryMax ≥ RetryBase",
			c.TokenTimeout, c.AckWait, c.RetryBase, c.RetryMax))
	}
	if c.Requests < 1 {
		errs = append(errs, fmt.Errorf("Requests is %d: set at least 1", c.Requests))
	}
	if c.MaxDeliver < 2 {
		errs = append(errs, fmt.Errorf("MaxDeliver is %d: set at least 2 so a transient failure can be retried", c.MaxDeliver))
	}
	if c.TenantRate < 0 || c.TenantBurst < 1 || c.TenantWorkers < 1 || c.MaxQueued < 1 {
		errs = append(errs, fmt.Errorf("TenantRate %g, TenantBurst %d, TenantWorkers %d, MaxQueued %d: rates and counts must be positive",
			c.TenantRate, c.TenantBurst, c.TenantWorkers, c.MaxQueued))
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("Replicas is %d: use 1, 3 or 5", c.Replicas))
	}
	if err := c.TokenHosts.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("workers config: %w", err)
	}
	return nil
}

// dueAckWaitMax bounds the due lane's ack wait. A proactive refresh fires
// in the first half of its lead, 15 s before expiry at the latest for the
// default lead of a 60 s token; a fired event held by a refresher that
// dies is delivered again only after the ack wait, so with the work lane's
// 30 s the token expired first (a soak with a SIGKILL handed out 18
// expired tokens). 5 s leaves that event 10 s to be refreshed elsewhere.
const dueAckWaitMax = 5 * time.Second

// dueAckWait is the due lane's ack wait.
func (c Config) dueAckWait() time.Duration { return min(c.AckWait, dueAckWaitMax) }

// progressEvery is how often held events and refreshes under way report
// progress: three times in the shortest ack wait of the lanes they came
// from, so that a late tick or a lost InProgress costs no redelivery.
func (c Config) progressEvery() time.Duration { return max(c.dueAckWait()/3, time.Millisecond) }
