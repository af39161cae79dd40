package workers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
	"golang.org/x/sync/errgroup"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
)

// Pool consumes auth.401 and auth.expiring events and refreshes credentials,
// and serves auth.register and auth.token. Create it with New and start it
// with Run; any number of pools may share one NATS deployment.
type Pool struct {
	cfg      Config
	nc       *nats.Conn
	js       jetstream.JetStream
	subj     events.Subjects
	store    *kv.Store
	leases   *kv.Leases
	cons     jetstream.Consumer
	work     jetstream.Stream // AUTH_EVENTS: events and pending schedules
	reauth   jetstream.Stream
	breakers *breakers
	// bg holds the work a refresh leaves behind after its ack (lease
	// release, the schedule's publish ack) so that it costs no round trip
	// on the refresh path; Run waits for it before returning.
	bg sync.WaitGroup
	// flights are the refreshes this pool runs now, by credential.
	flightsMu sync.Mutex
	flights   map[events.Key]*flight
	log       *slog.Logger
	tracer    trace.Tracer
	metrics   *metrics
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
		log:     cfg.Logger,
		tracer:  cfg.TracerProvider.Tracer(instrumentationName, trace.WithInstrumentationVersion(Version)),
	}
	p.cfg.HTTPClient = instrumentHTTP(cfg.HTTPClient, cfg.TracerProvider, cfg.MeterProvider)
	p.breakers = newBreakers(cfg.BreakerFailures, cfg.BreakerOpenFor, func(endpoint string, from, to gobreaker.State) {
		p.log.Warn("token endpoint breaker changed state", "endpoint", endpoint, "from", from.String(), "to", to.String())
	})
	if p.cons, err = p.provision(ctx); err != nil {
		return nil, err
	}
	if p.work, err = js.Stream(ctx, subj.EventsStream()); err != nil {
		return nil, fmt.Errorf("stream %s: %w", subj.EventsStream(), err)
	}
	if p.reauth, err = js.Stream(ctx, subj.ReauthStream()); err != nil {
		return nil, fmt.Errorf("stream %s: %w", subj.ReauthStream(), err)
	}
	if p.store, err = kv.NewStore(ctx, js, kv.StoreConfig{Bucket: subj.BucketName("CREDENTIALS"), Replicas: cfg.Replicas}, cfg.Seal); err != nil {
		return nil, err
	}
	if p.leases, err = kv.NewLeases(ctx, js, kv.LeaseConfig{Bucket: subj.BucketName("LEASES"), TTL: cfg.LeaseTTL, Replicas: cfg.Replicas}); err != nil {
		return nil, err
	}
	if p.metrics, err = newMetrics(cfg.MeterProvider, p); err != nil {
		return nil, err
	}
	return p, nil
}

// Store returns the credential store the pool uses.
func (p *Pool) Store() *kv.Store { return p.store }

// Leases returns the refresh leases the pool uses.
func (p *Pool) Leases() *kv.Leases { return p.leases }

// Run consumes events and serves requests until ctx is done, then shuts down
// gracefully: it stops taking work, hands the events it had fetched but not
// started back to the stream, and waits for in-flight refreshes to finish
// (each bounded by TokenTimeout) and release their leases. It returns nil
// after a clean shutdown. The caller drains and closes the connection.
func (p *Pool) Run(ctx context.Context) error {
	svc, err := p.startService()
	if err != nil {
		return err
	}
	defer svc.Stop()
	msgs, err := p.cons.Messages(
		// A pull batch near the worker count: the default of 500 lets one
		// process hoard a storm while the others idle.
		jetstream.PullMaxMessages(p.cfg.Workers),
		// Pull requests lost in a consumer leader change are noticed by
		// missed heartbeats (twice the interval) and re-issued: with the
		// defaults (30s expiry, 15s heartbeat) a failover stalls a pool
		// for 30s; with these, for about 4s, at the cost of a small
		// heartbeat message every 2s.
		jetstream.PullExpiry(10*time.Second),
		jetstream.PullHeartbeat(2*time.Second),
	)
	if err != nil {
		return fmt.Errorf("consume %s/%s: %w", p.subj.EventsStream(), consumerName, err)
	}
	stop := context.AfterFunc(ctx, func() {
		_ = svc.Stop()
		msgs.Drain()
	})
	defer stop()
	p.log.Info("refresh pool running", "instance", p.cfg.Instance, "workers", p.cfg.Workers, "stream", p.subj.EventsStream())

	// In-flight refreshes outlive ctx: abandoning a token-endpoint call
	// half-way may burn a rotating refresh token.
	work := context.WithoutCancel(ctx)
	var g errgroup.Group
	g.SetLimit(p.cfg.Workers)
	for {
		msg, err := msgs.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			break
		}
		if err != nil {
			// Missed heartbeats and the like: the iterator recovers by itself.
			p.log.Warn("consumer hiccup", "error", err)
			continue
		}
		if ctx.Err() != nil {
			// Fetched but not started: let another refresher have it now.
			_ = msg.Nak()
			continue
		}
		g.Go(func() error {
			p.handle(work, msg)
			return nil
		})
	}
	_ = g.Wait()
	p.bg.Wait()
	p.log.Info("refresh pool stopped", "instance", p.cfg.Instance)
	return nil
}

// outcome names, as logged and counted.
const (
	outRotated     = "rotated"
	outStale       = "stale"
	outNeedsReauth = "needs_reauth"
	outNotDue      = "not_due"
	outLostRace    = "lost_race"
	outDiscarded   = "discarded"
	outLeaseHeld   = "lease_held"
	outTransient   = "transient"
	outBreakerOpen = "breaker_open"
	outCanceled    = "canceled"
	outNATS        = "nats_unavailable"
	outBadInput    = "bad_input"
	outUnknownCred = "unknown_credential"
	outStoreFailed = "store_failed"
	outLeaseLost   = "lease_lost"
)

// How an event is settled.
const (
	actionAck = iota
	actionNak
	actionTerm
)

// result is what processing one event came to, and how to settle it.
type result struct {
	outcome string
	action  int
	delay   time.Duration // for actionNak
	detail  string        // term reason or log detail; never a secret
	version int64
}

func ack(outcome string) result { return result{outcome: outcome, action: actionAck} }

func nak(outcome string, delay time.Duration, detail string) result {
	return result{outcome: outcome, action: actionNak, delay: delay, detail: detail}
}

func term(outcome, detail string) result {
	return result{outcome: outcome, action: actionTerm, detail: detail}
}

// handle processes one event and settles it: ack, nak with a delay, or
// terminate with a reason.
func (p *Pool) handle(ctx context.Context, msg jetstream.Msg) {
	start := time.Now()
	var attempt uint64 = 1
	if md, err := msg.Metadata(); err == nil {
		attempt = md.NumDelivered
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
		trace.WithAttributes(processAttrs(msg.Subject(), len(msg.Data()), semconv.MessagingConsumerGroupName(consumerName))...))...)
	defer span.End()
	if id := msg.Headers().Get(jetstream.MsgIDHeader); id != "" {
		span.SetAttributes(semconv.MessagingMessageID(id))
	}

	f := &flight{span: span, msg: msg}
	r := p.process(ctx, in, attempt, f)
	joined := p.land(f)
	r = p.settle(ctx, msg, r, attempt, start)
	span.SetAttributes(attrOutcome.String(r.outcome), attrAttempt.Int64(int64(attempt)))
	if r.outcome == outLeaseHeld {
		span.SetAttributes(attrLeaseWait.Float64(r.delay.Seconds()))
	}
	if r.action == actionTerm || r.outcome == outStoreFailed || r.outcome == outTransient || r.outcome == outNATS {
		// Transient and NATS failures are retried later, but this attempt failed.
		span.SetStatus(codes.Error, r.outcome)
		span.SetAttributes(semconv.ErrorTypeKey.String(r.outcome))
	}
	p.settleJoined(ctx, joined, r)
}

// settle applies r to msg (ack, nak with a delay, or terminate with a
// reason), counts and logs it, and returns what it applied: a nak at the
// last delivery becomes a termination.
func (p *Pool) settle(ctx context.Context, msg jetstream.Msg, r result, attempt uint64, start time.Time) result {
	gaveUp := false
	if r.action == actionNak && attempt >= uint64(p.cfg.MaxDeliver) {
		// A work-queue stream keeps a message that reached MaxDeliver
		// forever, with only an advisory: terminate it ourselves.
		r = term(r.outcome, fmt.Sprintf("gave up after %d deliveries: %s %s", attempt, r.outcome, r.detail))
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
	level := slog.LevelInfo
	switch {
	case r.action == actionTerm || r.outcome == outStoreFailed || err != nil:
		level = slog.LevelWarn
	case r.outcome == outLeaseHeld || r.outcome == outNotDue || r.outcome == outStale:
		level = slog.LevelDebug
	}
	attrs := []slog.Attr{
		slog.String("subject", msg.Subject()), slog.String("outcome", r.outcome),
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
	if err != nil {
		attrs = append(attrs, slog.String("settle_error", err.Error()))
	}
	p.log.LogAttrs(ctx, level, "event processed", attrs...)
	return r
}

// inbound is an event as received: its subject parsed and its body decoded
// once, for join and process alike.
type inbound struct {
	subject string
	typ     events.Type
	key     events.Key
	named   bool          // the subject parsed: typ and key hold
	ev      *events.Event // nil when refused
	refused string        // why the event is refused, when it is
}

// receive parses msg's subject (authoritative for the key) and decodes and
// validates its body (step 1).
func (p *Pool) receive(msg jetstream.Msg) inbound {
	in := inbound{subject: msg.Subject()}
	typ, key, err := p.subj.ParseEvent(in.subject)
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

// process runs steps 1–7 of the refresh for one event (see DESIGN.md).
// Once it holds the lease, f is the flight of the credential.
func (p *Pool) process(ctx context.Context, in inbound, attempt uint64, f *flight) result {
	// 1. Decoded and validated by receive.
	span := trace.SpanFromContext(ctx)
	if in.named {
		span.SetName("process " + p.subj.EventWildcard(in.typ))
		span.SetAttributes(semconv.MessagingDestinationTemplate(p.subj.EventWildcard(in.typ)), attrKey.String(in.key.String()))
	}
	if in.ev == nil {
		return term(outBadInput, in.refused)
	}
	ev, key := in.ev, in.key
	span.SetAttributes(attrFingerprint.String(ev.Fingerprint()),
		semconv.CloudEventsEventID(ev.ID), semconv.CloudEventsEventSource(ev.Source),
		semconv.CloudEventsEventType(string(ev.Type)), semconv.CloudEventsEventSpecVersion(ev.SpecVersion))

	// 2. Load and decide without a lease: most events of a storm end here.
	readAt := time.Now()
	cred, rev, err := p.store.Get(ctx, key)
	if errors.Is(err, kv.ErrNotFound) {
		return term(outUnknownCred, fmt.Sprintf("credential %s is not registered; register it first", key))
	}
	if err != nil {
		return nak(outNATS, p.backoff(attempt), err.Error())
	}
	if r, done := p.decide(ctx, ev, cred); done {
		return r
	}
	if p.breakers.open(cred.TokenEndpoint) {
		return nak(outBreakerOpen, p.breakerWait(), "token endpoint breaker open")
	}

	// 3. Claim the lease.
	lease, err := p.claimLease(ctx, key)
	if errors.Is(err, kv.ErrLeaseHeld) {
		return nak(outLeaseHeld, jitter(p.cfg.LeaseWait), "")
	}
	if err != nil {
		return nak(outNATS, p.backoff(attempt), err.Error())
	}
	p.takeoff(f, key, cred.Fingerprint)
	defer p.bg.Go(func() {
		// After the ack, not before: the result is stored and announced,
		// and the release is fenced by the lease's revision, so waiting for
		// it would only add a round trip to every refresh.
		if err := lease.Release(context.WithoutCancel(ctx)); err != nil && !errors.Is(err, kv.ErrLeaseLost) {
			p.log.Warn("lease release failed; it expires by itself", "key", key.String(), "error", err)
		}
	})
	if !lease.Covers(rev, readAt) {
		// A peer may have rotated and released between our read and our
		// claim: decide again on what is stored now, or we would present
		// a refresh token it already redeemed. When the claim proves our
		// read saw every write made under a lease (see kv.Lease.Covers),
		// the read stands: one round trip less on most refreshes.
		cred, rev, err = p.store.Reread(ctx, cred, rev)
		if errors.Is(err, kv.ErrNotFound) {
			return term(outUnknownCred, fmt.Sprintf("credential %s was deleted", key))
		}
		if err != nil {
			return nak(outNATS, p.backoff(attempt), err.Error())
		}
		lease.Leaves(rev)
		if r, done := p.decide(ctx, ev, cred); done {
			return r
		}
	} else {
		lease.Leaves(rev)
	}
	if cred.Grant != events.GrantClientCredentials && cred.RefreshToken.IsZero() {
		return p.needsReauth(ctx, lease, cred, rev, "no_refresh_token",
			"the credential was registered without a refresh token; log in again and register the new tokens")
	}

	// 4. Call the token endpoint, keeping the lease until the result is
	// stored (the deferred stop runs before the deferred release).
	defer p.keepAlive(ctx, f, lease, key)()
	tok, err := p.exchange(ctx, cred)

	// 5. Classify.
	o := classify(err)
	switch o.verdict {
	case rotated:
		return p.storeRotation(ctx, lease, cred, rev, tok)
	case permanent:
		if !lease.Trusted(time.Now()) {
			// Another worker may hold the lease and be storing a newer
			// token right now: a needs_reauth written under CAS could win
			// and make it discard that token. Decide again later.
			return nak(outLeaseLost, jitter(p.cfg.LeaseWait), "lease lost during the token-endpoint call")
		}
		return p.permanentFailure(ctx, lease, cred, rev, o)
	case breakerOpen:
		return nak(outBreakerOpen, p.breakerWait(), "token endpoint breaker open")
	case canceled:
		return nak(outCanceled, 0, "refresh canceled by shutdown")
	default:
		delay := min(o.retryAfter, maxRetryAfter)
		if delay == 0 {
			delay = p.backoff(attempt)
		}
		detail := "token endpoint unreachable or failing"
		if o.status != 0 {
			detail = fmt.Sprintf("token endpoint answered HTTP %d", o.status)
		}
		return nak(outTransient, delay, detail)
	}
}

// decide answers an event from the stored credential alone when it can: in
// the order stale, needs_reauth, not due.
func (p *Pool) decide(ctx context.Context, ev *events.Event, c *kv.Credential) (result, bool) {
	now := time.Now()
	if ev.Fingerprint() != c.Fingerprint && c.Valid(now) {
		if err := p.announceRotated(ctx, c); err != nil {
			return nak(outNATS, jitter(p.cfg.LeaseWait), err.Error()), true
		}
		r := ack(outStale)
		r.version = c.Version
		return r, true
	}
	if c.State == kv.StateNeedsReauth {
		if err := p.announceNeedsReauth(ctx, c); err != nil {
			return nak(outNATS, jitter(p.cfg.LeaseWait), err.Error()), true
		}
		r := ack(outNeedsReauth)
		r.version = c.Version
		return r, true
	}
	if ev.Type == events.TypeExpiring && !p.due(c, now) {
		return ack(outNotDue), true
	}
	return result{}, false
}

// due reports whether the proactive refresh of c should happen now. A token
// without an expiry is refreshed only on 401.
func (p *Pool) due(c *kv.Credential, now time.Time) bool {
	if c.ExpiresAt.IsZero() {
		return false
	}
	return !c.ExpiresAt.Add(-p.lead(c)).After(now)
}

// keepAlive tells JetStream the event is in progress and renews the lease
// until stop is called, so that neither a slow token endpoint nor a slow
// store (a KV leader election) costs the redelivery or the lease: another
// worker claiming it would present the refresh token just redeemed.
func (p *Pool) keepAlive(ctx context.Context, f *flight, lease *kv.Lease, key events.Key) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	every := min(p.cfg.AckWait, p.leases.TTL()) / 3
	wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				f.inProgress()
				if err := lease.Renew(ctx); err != nil {
					p.log.Warn("lease renewal failed during a refresh", "key", key.String(), "error", err)
					if errors.Is(err, kv.ErrLeaseLost) {
						return
					}
				}
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// storeRotation is step 6 and 7 for a new token.
func (p *Pool) storeRotation(ctx context.Context, lease *kv.Lease, old *kv.Credential, rev uint64, tok *oauth2.Token) result {
	now := time.Now().UTC()
	if !lease.Trusted(now) {
		// Still store: the compare-and-set on the credential's revision is
		// the fence that keeps newer tokens safe, and dropping an answer
		// whose refresh token was already redeemed would force a re-login.
		p.log.Warn("lease lost during the token-endpoint call; storing under compare-and-set only", "key", old.Key.String())
	}
	c := old.Clone()
	c.Version++
	c.AccessToken = kv.Secret(tok.AccessToken)
	c.TokenType = tok.TokenType
	if c.TokenType == "" {
		c.TokenType = "Bearer"
	}
	c.Fingerprint = events.Fingerprint(tok.AccessToken)
	c.ReceivedAt = now
	c.ExpiresAt = time.Time{}
	if !tok.Expiry.IsZero() {
		// x/oauth2 turns expires_in into an absolute time when the answer arrives.
		c.ExpiresAt = tok.Expiry.UTC()
	}
	if tok.RefreshToken != "" {
		c.RefreshToken = kv.Secret(tok.RefreshToken)
	} // else: carry the old one forward (RFC 6749 §6).
	c.State, c.Reason, c.Description = kv.StateActive, "", ""
	c.UpdatedAt = now

	_, err := p.storeCredential(ctx, lease, c, rev)
	if errors.Is(err, kv.ErrConflict) {
		// Someone newer wrote first (a re-registration): a late completion
		// must never overwrite newer tokens. Nothing is published.
		return ack(outDiscarded)
	}
	if err != nil {
		p.log.Error("storing a rotated token failed; the new refresh token is lost and the next refresh will reuse the old one",
			"key", c.Key.String(), "fingerprint", c.Fingerprint, "error", err)
		return nak(outStoreFailed, p.cfg.RetryBase, err.Error())
	}
	if err := p.announceRotated(ctx, c); err != nil {
		p.log.Warn("announcing a rotation failed; runtimes will get it from auth.token", "key", c.Key.String(), "error", err)
	}
	p.scheduleAsync(ctx, c)
	r := ack(outRotated)
	r.version = c.Version
	return r
}

// updateRetrying retries a CAS update through short NATS outages: the token
// it carries was already redeemed and cannot be fetched again.
func (p *Pool) updateRetrying(ctx context.Context, c *kv.Credential, rev uint64) (uint64, error) {
	// Keep trying for as long as the lease lives: these are new tokens
	// whose refresh token is already redeemed, and a KV leader election
	// can take seconds. Giving up costs the user a login.
	deadline := time.Now().Add(p.cfg.LeaseTTL)
	for i := 0; ; i++ {
		nrev, err := p.store.Update(ctx, c, rev)
		if err == nil || errors.Is(err, kv.ErrConflict) {
			return nrev, err
		}
		wait := min(time.Duration(100<<min(i, 4))*time.Millisecond, time.Second)
		if time.Now().Add(wait).After(deadline) {
			return 0, err
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return 0, err
		}
	}
}

// permanentFailure handles an OAuth error that no retry can fix — unless
// another refresher won the race and spent the refresh token we sent.
func (p *Pool) permanentFailure(ctx context.Context, lease *kv.Lease, sent *kv.Credential, rev uint64, o outcome) result {
	cur, crev, err := p.store.Get(ctx, sent.Key)
	if err != nil {
		return nak(outNATS, p.cfg.RetryBase, err.Error())
	}
	if cur.Version != sent.Version || cur.RefreshToken != sent.RefreshToken {
		lease.Leaves(crev)
		return p.lostRace(ctx, cur)
	}
	return p.needsReauth(ctx, lease, sent, rev, o.reason, o.description)
}

// lostRace answers an event whose refresh another refresher completed first.
func (p *Pool) lostRace(ctx context.Context, cur *kv.Credential) result {
	var err error
	if cur.State == kv.StateNeedsReauth {
		err = p.announceNeedsReauth(ctx, cur)
	} else {
		err = p.announceRotated(ctx, cur)
	}
	if err != nil {
		p.log.Warn("re-announcing after a lost race failed", "key", cur.Key.String(), "error", err)
	}
	r := ack(outLostRace)
	r.version = cur.Version
	return r
}

// needsReauth records that only a person can fix the credential and tells
// the runtimes.
func (p *Pool) needsReauth(ctx context.Context, lease *kv.Lease, old *kv.Credential, rev uint64, reason, description string) result {
	c := old.Clone()
	c.State, c.Reason, c.Description = kv.StateNeedsReauth, reason, scrub(description, old)
	c.UpdatedAt = time.Now().UTC()
	if _, err := p.storeCredential(ctx, lease, c, rev); err != nil {
		if errors.Is(err, kv.ErrConflict) {
			if cur, _, gerr := p.store.Get(ctx, old.Key); gerr == nil {
				return p.lostRace(ctx, cur)
			}
		}
		return nak(outNATS, p.cfg.RetryBase, err.Error())
	}
	if err := p.announceNeedsReauth(ctx, c); err != nil {
		return nak(outNATS, p.cfg.RetryBase, err.Error())
	}
	r := ack(outNeedsReauth)
	r.detail = reason
	r.version = c.Version
	return r
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
