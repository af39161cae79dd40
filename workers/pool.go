package workers

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
)

// Pool consumes auth.401 and auth.expiring events and refreshes credentials,
// and serves auth.register and auth.token. Create it with New and start it
// with Run; any number of pools may share one NATS deployment.
type Pool struct {
	cfg      Config
	nc       *nats.Conn // writes JetStream and announces
	serve    *nats.Conn // serves runtimes: the service and the intake (cfg.ServeConn, or nc)
	js       jetstream.JetStream
	subj     events.Subjects
	store    *kv.Store
	leases   *kv.Leases
	failures *kv.Failures       // the last failed refresh of each credential, for status
	cons     jetstream.Consumer // the work lane
	slow     jetstream.Consumer // the slow lane (see intake.go)
	dueCons  jetstream.Consumer // the due lane: fired schedules
	work     jetstream.Stream   // AUTH_EVENTS: events (and an earlier version's schedules)
	sched    jetstream.Stream   // AUTH_SCHEDULES: pending schedules and what they fired
	// legacySchedules: the events stream may hold schedules an earlier
	// version wrote (LegacySchedule), which a new schedule then removes.
	// Found at New, updated by every reconciler pass.
	legacySchedules atomic.Bool
	reauth          jetstream.Stream
	breakers        *breakers
	// bg holds the work a refresh leaves behind after its ack (lease
	// release, the schedule's publish ack) so that it costs no round trip
	// on the refresh path; Run waits for it before returning.
	bg sync.WaitGroup
	// serving holds the goroutines that serve auth.register and auth.token
	// requests (see lanes); Run waits for them before returning.
	serving  sync.WaitGroup
	requests []*lanes // of the service's endpoints
	// flights are the refreshes this pool runs now, by credential.
	flightsMu sync.Mutex
	flights   map[events.Key]*flight
	// handlers are the refreshes the dispatcher started; Run waits for them.
	handlers sync.WaitGroup
	started  chan struct{} // closed once Run serves (see Started)
	log      *slog.Logger
	tracer   trace.Tracer
	metrics  *metrics
	keeper   *keeper // parked credentials and schedule metrics (keep.go)
}

// New checks cfg, and creates the streams, consumer and buckets when they
// are missing (idempotent). It does not start any work; see Run.
func New(ctx context.Context, nc *nats.Conn, cfg Config) (*Pool, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	subj, err := events.NewSubjects(cfg.Prefix)
	if err != nil {
		return nil, fmt.Errorf("workers config: Prefix: %w", err)
	}
	// Async publishes (the schedules) must resolve even when the
	// connection dies, or Run would wait for their acks forever.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	p := &Pool{
		cfg:     cfg,
		nc:      nc,
		js:      js,
		subj:    subj,
		flights: make(map[events.Key]*flight),
		started: make(chan struct{}),
		serve:   cfg.ServeConn,
		log:     cfg.Logger,
		tracer:  cfg.TracerProvider.Tracer(instrumentationName, trace.WithInstrumentationVersion(Version)),
	}
	if p.serve == nil {
		p.serve = nc
	}
	p.cfg.HTTPClient = instrumentHTTP(cfg.HTTPClient, cfg.TracerProvider, cfg.MeterProvider)
	if p.keeper, err = newKeeper(cfg.MeterProvider); err != nil {
		return nil, err
	}
	p.breakers = newBreakers(cfg.BreakerFailures, cfg.BreakerOpenFor, func(k breakerKey, from, to gobreaker.State) {
		p.log.Warn("token endpoint breaker changed state", "scope", k.scope.String(), "endpoint", redactURL(k.endpoint),
			"tenant", k.tenant, "client_id", k.client, "from", from.String(), "to", to.String())
		p.keeper.breakerChanged(k.endpoint, from, to)
	})
	cons, err := p.provision(ctx)
	if err != nil {
		return nil, err
	}
	p.cons, p.slow, p.dueCons = cons.work, cons.slow, cons.due
	if p.work, err = js.Stream(ctx, subj.EventsStream()); err != nil {
		return nil, fmt.Errorf("stream %s: %w", subj.EventsStream(), err)
	}
	if p.sched, err = js.Stream(ctx, subj.SchedulesStream()); err != nil {
		return nil, fmt.Errorf("stream %s: %w", subj.SchedulesStream(), err)
	}
	if err := p.findLegacySchedules(ctx); err != nil {
		return nil, err
	}
	if p.reauth, err = js.Stream(ctx, subj.ReauthStream()); err != nil {
		return nil, fmt.Errorf("stream %s: %w", subj.ReauthStream(), err)
	}
	if p.store, err = kv.NewStore(ctx, js, kv.StoreConfig{Bucket: subj.CredentialsBucket(), Replicas: cfg.Replicas}, cfg.Seal); err != nil {
		return nil, err
	}
	p.warnReplicas("bucket", subj.CredentialsBucket(), p.store.Replicas())
	if p.leases, err = kv.NewLeases(ctx, js, kv.LeaseConfig{Bucket: subj.LeasesBucket(), TTL: cfg.LeaseTTL, Replicas: cfg.Replicas}); err != nil {
		return nil, err
	}
	p.warnReplicas("bucket", subj.LeasesBucket(), p.leases.Replicas())
	if p.failures, err = kv.NewFailures(ctx, js, kv.FailuresConfig{Bucket: subj.FailuresBucket(), Replicas: cfg.Replicas}); err != nil {
		return nil, err
	}
	if p.metrics, err = newMetrics(cfg.MeterProvider, p); err != nil {
		return nil, err
	}
	return p, nil
}

// Started returns a channel that is closed once Run serves: the
// auth.register and auth.token service answers, the intake takes events in
// and both lanes are consumed. Run closes it at most once; a Pool runs once.
func (p *Pool) Started() <-chan struct{} { return p.started }

// Store returns the credential store the pool uses.
func (p *Pool) Store() *kv.Store { return p.store }

// Leases returns the refresh leases the pool uses.
func (p *Pool) Leases() *kv.Leases { return p.leases }

// Run takes in runtimes' events (see intake.go), consumes them and serves
// requests until ctx is done, then shuts down gracefully: it stops taking
// work, hands the events it had fetched but not started back to the stream, and waits for in-flight refreshes to finish
// (each bounded by TokenTimeout) and release their leases. It returns nil
// after a clean shutdown. The caller drains and closes the connection.
func (p *Pool) Run(ctx context.Context) error {
	svc, err := p.startService()
	if err != nil {
		return err
	}
	defer func() {
		_ = svc.Stop()
		// A handler that was running when the service stopped may still
		// hand over a request: close first, then wait for those taken.
		for _, l := range p.requests {
			l.close()
		}
		p.serving.Wait()
	}()
	intake, err := p.startIntake()
	if err != nil {
		return err
	}
	// Also when Run ends without ctx (its connection closed under it).
	defer intake.stop()
	workLane, slowLane := make(chan jetstream.Msg), make(chan jetstream.Msg)
	// Consume, not Messages: Messages hands events and the server's status
	// messages over through a channel of the pull batch's size and drops
	// what does not fit; registering a million credentials on a starved
	// machine did ("slow consumer, messages dropped" on the pools' pull
	// inboxes). Consume queues them; its handler blocks while the
	// dispatcher has no free worker, and pulls again only after it returns.
	consume := func(c jetstream.Consumer, batch int, lane chan<- jetstream.Msg) (jetstream.ConsumeContext, error) {
		return c.Consume(func(msg jetstream.Msg) { lane <- msg },
			// A pull batch near the worker count: the default of 500 lets
			// one process hoard a storm while the others idle.
			jetstream.PullMaxMessages(batch),
			// Pull requests lost in a consumer leader change are noticed
			// by missed heartbeats (twice the interval) and re-issued: with
			// the defaults (30s expiry, 15s heartbeat) a failover stalls a
			// pool for 30s; with these, for about 4s, at the cost of a
			// small heartbeat message every 2s.
			jetstream.PullExpiry(10*time.Second),
			jetstream.PullHeartbeat(2*time.Second),
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				// Missed heartbeats and the like: the consumer recovers by itself.
				p.log.Warn("consumer hiccup", "error", err)
			}),
		)
	}
	workCC, err := consume(p.cons, p.cfg.Workers, workLane)
	if err != nil {
		intake.stop()
		return fmt.Errorf("consume %s/%s: %w", p.subj.EventsStream(), consumerName, err)
	}
	// The slow lane's batch is small: its messages may wait in this process
	// while the work lane is busy, and their ack wait runs meanwhile.
	slowCC, err := consume(p.slow, max(1, p.cfg.Workers/4), slowLane)
	if err != nil {
		intake.stop()
		workCC.Stop()
		return fmt.Errorf("consume %s/%s: %w", p.subj.EventsStream(), slowConsumerName, err)
	}
	// Fired schedules are proactive refreshes: they keep the work lane's
	// priority over the slow lane.
	dueCC, err := consume(p.dueCons, max(1, p.cfg.Workers/2), workLane)
	if err != nil {
		intake.stop()
		workCC.Stop()
		slowCC.Stop()
		return fmt.Errorf("consume %s/%s: %w", p.subj.SchedulesStream(), dueConsumerName, err)
	}
	stop := context.AfterFunc(ctx, func() {
		_ = svc.Stop()
		intake.stop()
		workCC.Drain()
		slowCC.Drain()
		dueCC.Drain()
	})
	defer stop()
	defer p.keepSchedules(ctx)()
	p.log.Info("refresh pool running", "instance", p.cfg.Instance, "workers", p.cfg.Workers, "stream", p.subj.EventsStream())
	// Subscriptions reach the server asynchronously: once a round trip
	// has, a request sent from anywhere finds them.
	if err := p.serve.Flush(); err != nil {
		p.log.Warn("confirming the service's subscriptions", "error", err)
	}
	close(p.started)

	// No handler runs once a consumer is closed (shutdown, or the
	// connection closed under Run): then its lane ends.
	var readers sync.WaitGroup
	readers.Go(func() { <-workCC.Closed(); <-dueCC.Closed(); close(workLane) })
	readers.Go(func() { <-slowCC.Closed(); close(slowLane) })

	// In-flight refreshes outlive ctx: abandoning a token-endpoint call
	// half-way may burn a rotating refresh token.
	newDispatcher(p, ctx, context.WithoutCancel(ctx)).run(workLane, slowLane)
	readers.Wait()
	p.handlers.Wait()
	p.bg.Wait()
	p.log.Info("refresh pool stopped", "instance", p.cfg.Instance)
	return nil
}

// handle processes one event and settles it: ack, nak with a delay, or
// terminate with a reason.
func (p *Pool) handle(ctx context.Context, msg jetstream.Msg) {
	start := time.Now()
	attempt, group := uint64(1), consumerName
	if md, err := msg.Metadata(); err == nil {
		attempt, group = md.NumDelivered, md.Consumer
	}
	in := p.receive(msg)
	if p.join(msg, in, attempt, start) {
		return // the flight it joined settles it
	}
	ctx = telemetry.Extract(ctx, msg.Headers())
	// One process span per delivery, a child of the span that published
	// the event (see telemetry.Extract); process renames it once the
	// subject is parsed.
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer)}
	if msg.Headers().Get(jetstream.SchedulerHeader) != "" {
		// A proactive refresh fires long after the refresh that scheduled
		// it: a trace of its own linked to the schedule, rather than one
		// trace for the whole life of a credential.
		opts = append(opts, trace.WithNewRoot(),
			trace.WithLinks(trace.Link{SpanContext: trace.SpanContextFromContext(ctx)}))
	}
	ctx, span := p.tracer.Start(ctx, "process", append(opts,
		trace.WithAttributes(processAttrs(msg.Subject(), len(msg.Data()), semconv.MessagingConsumerGroupName(group))...))...)
	defer span.End()
	if id := msg.Headers().Get(jetstream.MsgIDHeader); id != "" {
		span.SetAttributes(semconv.MessagingMessageID(id))
	}

	f := &flight{span: span, msg: msg}
	r := p.refresh(ctx, in, attempt, f)
	joined := p.land(f)
	r = p.settle(ctx, msg, r, attempt, start)
	span.SetAttributes(attrOutcome.String(r.outcome.String()), attrAttempt.Int64(int64(attempt)))
	if r.outcome == outLeaseHeld {
		span.SetAttributes(attrLeaseWait.Float64(r.delay.Seconds()))
	}
	if r.action == actionTerm || outcomes[r.outcome].failed {
		// Transient and NATS failures are retried later, but this attempt failed.
		span.SetStatus(codes.Error, r.outcome.String())
		span.SetAttributes(semconv.ErrorTypeKey.String(r.outcome.String()))
	}
	p.settleJoined(ctx, joined, r)
}

// settle applies r to msg (ack, nak with a delay, or terminate with a
// reason), counts and logs it, and returns what it applied: a nak at the
// last delivery becomes a termination.
func (p *Pool) settle(ctx context.Context, msg jetstream.Msg, r result, attempt uint64, start time.Time) result {
	gaveUp := false
	if p.givesUp(r, attempt) {
		// A work-queue stream keeps a message that reached MaxDeliver
		// forever, with only an advisory: terminate it ourselves.
		r.action, r.detail = actionTerm, fmt.Sprintf("gave up after %d deliveries: %s %s", attempt, r.outcome, r.detail)
		gaveUp = true
	}
	var err error
	switch r.action {
	case actionAck:
		err = msg.Ack()
	case actionNak:
		err = msg.NakWithDelay(r.delay)
	case actionTerm:
		err = msg.TermWithReason(r.detail)
	}
	p.metrics.settled(ctx, r, gaveUp, time.Since(start))
	level := outcomes[r.outcome].level
	if r.action == actionTerm || err != nil {
		level = slog.LevelWarn
	}
	attrs := []slog.Attr{
		slog.String("subject", msg.Subject()), slog.String("outcome", r.outcome.String()),
		slog.Uint64("attempt", attempt), slog.Duration("took", time.Since(start)),
	}
	if r.detail != "" {
		attrs = append(attrs, slog.String("detail", r.detail))
	}
	if r.version != 0 {
		attrs = append(attrs, slog.Int64("version", r.version))
	}
	if r.action == actionNak {
		attrs = append(attrs, slog.Duration("retry_in", r.delay))
	}
	if lag, ok := p.scheduleLag(ctx, msg, attempt, start); ok {
		attrs = append(attrs, slog.Duration("schedule_lag", lag))
	}
	if err != nil {
		attrs = append(attrs, slog.String("settle_error", err.Error()))
	}
	p.log.LogAttrs(ctx, level, "event processed", attrs...)
	return r
}

// inbound is an event as received: its subject parsed and its body decoded
// once, for join and refresh alike.
type inbound struct {
	subject string
	typ     events.Type
	key     events.Key
	named   bool          // the subject parsed: typ and key hold
	ev      *events.Event // nil when refused
	refused string        // why the event is refused, when it is
}

// receive parses msg's subject (authoritative for the key) and decodes and
// validates its body (step 1 of the refresh, done on receipt so that the
// event can join a flight).
func (p *Pool) receive(msg jetstream.Msg) inbound {
	in := inbound{subject: msg.Subject()}
	typ, key, err := p.subj.ParseWork(in.subject)
	if err != nil {
		in.refused = err.Error()
		return in
	}
	in.typ, in.key, in.named = typ, key, true
	if typ != events.Type401 && typ != events.TypeExpiring {
		in.refused = fmt.Sprintf("event type %s is not consumed by refreshers", typ)
		return in
	}
	if in.ev, err = events.Decode(typ, key, msg.Data()); err != nil {
		in.refused = err.Error()
	}
	return in
}

// backoff is capped exponential backoff with jitter for the given delivery.
func (p *Pool) backoff(attempt uint64) time.Duration {
	shift := min(attempt, 30)
	if shift > 0 {
		shift--
	}
	d := p.cfg.RetryBase << shift
	if d <= 0 || d > p.cfg.RetryMax {
		d = p.cfg.RetryMax
	}
	return jitter(d)
}

// breakerWait is how long an event waits for an open breaker: about until
// it half-opens, spread so the waiting events do not all return at once.
func (p *Pool) breakerWait() time.Duration { return jitter(p.cfg.BreakerOpenFor) }

// jitter spreads d over [d/2, d].
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// scrub removes c's secrets from text an authorization server wrote: some
// echo the refresh token in error_description, and the description is
// stored, published and kept for 30 days.
func scrub(text string, c *kv.Credential) string {
	for _, secret := range []kv.Secret{c.RefreshToken, c.ClientSecret, c.AccessToken} {
		if s := secret.Reveal(); len(s) >= 4 {
			text = strings.ReplaceAll(text, s, "[redacted]")
		}
	}
	return text
}
