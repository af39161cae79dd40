package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"golang.org/x/time/rate"

	"github.com/authbus/authbus/events"
)

// The intake: runtimes publish auth.401 and auth.expiring on their own
// subjects, and the refreshers — not the runtimes — put what they accept
// into the events stream, on subjects only refreshers write (Work). A
// tenant therefore never publishes into a stream another tenant shares,
// and none of JetStream's stream-wide headers reach it: no roll-up that
// empties the queue, no schedule that purges or forges another tenant's,
// no expected-last-* header that answers with another tenant's keys, no
// Nats-Msg-Id that suppresses another tenant's 401 (the intake computes it
// from the validated subject and fingerprint). Only the trace context
// crosses over.
//
// What a runtime sees does not change: a JetStream publish gets a PubAck
// (duplicate or not) from the intake, as it would from the stream; a core
// publish works as before. What changes: an event is refused at once when
// it is bad, or when its reply subject is not the requester's own inbox;
// and every report of a token is de-duplicated (the intake sets the
// Nats-Msg-Id a runtime may have left out).
//
// Fairness: each tenant may report a number of new events per second (a
// token bucket, Config.TenantRate and TenantBurst); what it reports beyond
// goes to the slow lane (Subjects.Slow), which the refreshers take only
// when nothing waits in the work lane. A tenant's flood therefore delays
// another tenant's event by at most its burst, and nothing legitimate is
// refused: a storm of a big tenant is slowed, not dropped. The intake
// handler is cheap for a flood (a duplicate is answered from a cache by
// its Nats-Msg-Id before any decoding). Beyond Config.MaxQueued waiting
// events new ones are refused (503), so a flood cannot fill the store.
// intakeQueue is the queue group of every refresher's intake subscriptions:
// each event is taken in by one of them.
const intakeQueue = "authbus-intake"

// intakeSubscriptions is how many members of the queue group each
// refresher has per event type.
const intakeSubscriptions = 4

// Header names the intake copies into the stream: the W3C trace context,
// so the refresh's process span is a child of the runtime's publish.
var traceHeaders = []string{"traceparent", "tracestate"}

// intake takes runtimes' events into the stream. Safe for concurrent use.
type intake struct {
	p    *Pool
	subs []*nats.Subscription

	limits   *tenantLimits
	seen     *recentIDs
	queued   [2]*infoCache // both lanes' pending counts, for MaxQueued
	slowq    chan slowEvent
	quit     chan struct{}  // closed by stop: the slow worker ends
	slow     sync.WaitGroup // slowWorker
	stopOnce sync.Once

	refused metric.Int64Counter // authbus.intake.refused{reason}
	slowed  metric.Int64Counter // authbus.intake.slowed
}

func (p *Pool) startIntake() (*intake, error) {
	in := &intake{p: p, limits: newTenantLimits(p.cfg.TenantRate, p.cfg.TenantBurst), seen: newRecentIDs(p.cfg.DuplicateWindow, 1<<16),
		queued: [2]*infoCache{{cons: p.cons, ttl: time.Second}, {cons: p.slow, ttl: time.Second}},
		slowq:  make(chan slowEvent, slowQueue), quit: make(chan struct{})}
	in.slow.Go(in.slowWorker)
	var err error
	in.refused, err = p.cfg.MeterProvider.Meter(instrumentationName).Int64Counter("authbus.intake.refused",
		metric.WithUnit("{event}"),
		metric.WithDescription("auth.401 and auth.expiring refused by the intake, by reason (bad_input, reply_refused, unavailable)"))
	if err != nil {
		return nil, err
	}
	in.slowed, err = p.cfg.MeterProvider.Meter(instrumentationName).Int64Counter("authbus.intake.slowed",
		metric.WithUnit("{event}"),
		metric.WithDescription("new events tenants reported beyond their rate, put in the slow lane (tenants are not a label: their number is not bounded)"))
	if err != nil {
		return nil, err
	}
	// Several members of the queue group per event type: NATS delivers to
	// one subscription in order, so with one a flood of one tenant would
	// queue another tenant's event behind all of it; with several, behind
	// a share of it, each share taken in concurrently.
	var types []events.Type
	for range intakeSubscriptions {
		types = append(types, events.Type401, events.TypeExpiring)
	}
	for _, t := range types {
		sub, err := p.serve.QueueSubscribe(p.subj.EventWildcard(t), intakeQueue, in.take)
		if err != nil {
			in.stop()
			return nil, fmt.Errorf("intake: subscribe to %s: %w; check the refresher's NATS permissions", p.subj.EventWildcard(t), err)
		}
		// A storm arrives faster than one handler takes it in; the
		// handler is cheap (the stream write is asynchronous), so allow
		// a deep queue rather than drop reports.
		_ = sub.SetPendingLimits(1<<20, 256<<20)
		in.subs = append(in.subs, sub)
	}
	return in, nil
}

// stop ends the intake: no new event is taken in; events taken in
// already are written and answered (their acknowledgements are waited for
// by the pool's background group).
func (in *intake) stop() {
	var closed []<-chan nats.SubStatus
	for _, s := range in.subs {
		closed = append(closed, s.StatusChanged(nats.SubscriptionClosed))
		if err := s.Drain(); err != nil {
			_ = s.Unsubscribe()
		}
	}
	// Drain returns at once; a subscription closes once the events it had
	// queued are handled. Bounded: a connection that died never closes it.
	timeout := time.After(10 * time.Second)
wait:
	for i, c := range closed {
		if !in.subs[i].IsValid() {
			continue
		}
		select {
		case <-c:
		case <-timeout:
			break wait
		}
	}
	// The queue itself is never closed: a handler still running on a
	// subscription that did not drain may still hand an event over.
	in.stopOnce.Do(func() { close(in.quit) })
	in.slow.Wait()
}

// take is the subscription handler: it validates one runtime event and
// writes it to the stream, or refuses it. It must stay cheap: every event
// of every tenant passes through it in order.
func (in *intake) take(m *nats.Msg) {
	p := in.p
	typ, key, err := p.subj.ParseEvent(m.Subject)
	if err != nil {
		// The subscription matches only event subjects of these types, but
		// a key part may still be invalid (auth.401.acme.kim.git$hub).
		// Without a valid key there is no tenant whose inbox to check, so
		// only the default inbox is answered.
		in.refuse(m, events.Key{}, "bad_input", 400, err.Error())
		return
	}
	if m.Reply != "" && !replyAllowed(m.Reply, key.Tenant) {
		// A reply subject elsewhere than the requester's own inbox would
		// make the refresher write there with its rights (a KV key, the
		// JetStream API, another tenant's subjects). Not answered at all.
		in.refuse(m, key, "reply_refused", 0, "")
		return
	}
	// A duplicate of a report this refresher wrote inside the duplicate
	// window is answered before anything else: a storm's reports carry
	// the id, and decoding each would make the storm costly. A runtime
	// that names another of its own key's ids is only told a duplicate.
	if id := m.Header.Get(jetstream.MsgIDHeader); strings.HasPrefix(id, string(typ)+":"+key.String()+":") {
		if ack, ok := in.seen.get(id); ok {
			in.respond(m, ack)
			return
		}
	}
	// A tenant over its rate goes to the slow lane, and is decoded and
	// written there by the slow worker: its flood costs this handler a
	// subject parse and a bucket check each, so that another tenant's
	// event behind it in the subscription is taken in at once.
	if !in.limits.allow(key.Tenant) {
		select {
		case in.slowq <- slowEvent{m, typ, key}:
			in.slowed.Add(context.Background(), 1)
		default:
			in.refuse(m, key, "unavailable", 503, fmt.Sprintf(
				"%d events of tenants over their rate wait to be taken in already; retry later", cap(in.slowq)))
		}
		return
	}
	in.write(m, typ, key, p.subj.Work(typ, key), func() {})
}

// slowEvent is an event of a tenant over its rate, waiting for the slow
// worker.
type slowEvent struct {
	m   *nats.Msg
	typ events.Type
	key events.Key
}

// slowQueue is how many events of tenants over their rate may wait to be
// taken in; beyond it they are refused (503).
const slowQueue = 16 << 10

// slowWorker takes in the events of tenants over their rate, into the slow
// lane, until stop ends it.
//
// It keeps at most slowInFlight of its writes unanswered: the intake's
// writes share the refresher's connection, and a flood written as fast as
// it comes would queue every other tenant's write behind it there.
func (in *intake) slowWorker() {
	tokens := make(chan struct{}, slowInFlight)
	take := func(e slowEvent) {
		tokens <- struct{}{}
		in.write(e.m, e.typ, e.key, in.p.subj.Slow(e.typ, e.key), func() { <-tokens })
	}
	for {
		select {
		case e := <-in.slowq:
			take(e)
		case <-in.quit:
			// What was handed over before the intake stopped is taken in.
			for {
				select {
				case e := <-in.slowq:
					take(e)
				default:
					return
				}
			}
		}
	}
}

// jsDuplicateInProcess is nats-server's answer to a write whose
// Nats-Msg-Id another write of a replicated stream is committing now.
const jsDuplicateInProcess jetstream.ErrorCode = 10158

// slowInFlight bounds the slow worker's unanswered writes.
const slowInFlight = 32

// write decodes and validates m and writes it to subject of the stream, or
// refuses it, and answers the requester with what the stream answered.
// done is called once the write is answered or was never made.
func (in *intake) write(m *nats.Msg, typ events.Type, key events.Key, subject string, done func()) {
	p := in.p
	ev, err := events.Decode(typ, key, m.Data)
	if err != nil {
		done()
		in.refuse(m, key, "bad_input", 400, err.Error())
		return
	}
	id := events.MsgID(typ, key, ev.Fingerprint())
	if ack, ok := in.seen.get(id); ok {
		done()
		in.respond(m, ack)
		return
	}
	if in.full() {
		done()
		in.refuse(m, key, "unavailable", 503, fmt.Sprintf(
			"%d events wait for a refresher already; retry shortly", p.cfg.MaxQueued))
		return
	}
	out := nats.NewMsg(subject)
	out.Data = m.Data
	for _, h := range traceHeaders {
		if v := m.Header.Get(h); v != "" {
			out.Header.Set(h, v)
		}
	}
	future, err := p.js.PublishMsgAsync(out, jetstream.WithMsgID(id))
	if err != nil {
		done()
		in.refuse(m, key, "unavailable", 503, fmt.Sprintf("the events stream took no write (%v); retry shortly", err))
		return
	}
	p.bg.Go(func() {
		defer done()
		select {
		case ack := <-future.Ok():
			in.seen.put(id, *ack)
			in.respond(m, *ack)
		case err := <-future.Err():
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) && apiErr.ErrorCode == jsDuplicateInProcess {
				// Another refresher's intake is writing the same report
				// right now (a replicated stream answers so until it has
				// committed): a duplicate.
				in.respond(m, jetstream.PubAck{Stream: p.subj.EventsStream(), Duplicate: true})
				return
			}
			in.refuse(m, key, "unavailable", 503, fmt.Sprintf("the events stream took no write (%v); retry shortly", err))
		}
	})
}

// full reports whether MaxQueued events wait in the stream already. A count
// that cannot be had (NATS trouble) does not refuse: the write will say.
func (in *intake) full() bool {
	n := 0
	for _, q := range in.queued {
		if ci := q.get(context.Background()); ci != nil {
			n += int(ci.NumPending) + ci.NumAckPending
		}
	}
	return n >= in.p.cfg.MaxQueued
}

// respond answers a JetStream publish with the stream's acknowledgement.
func (in *intake) respond(m *nats.Msg, ack jetstream.PubAck) {
	if m.Reply == "" {
		return
	}
	b, _ := json.Marshal(ack)
	if err := m.Respond(b); err != nil {
		in.p.log.Debug("intake: answering a report failed", "subject", m.Subject, "error", err)
	}
}

// refuse counts and logs a refused event and, when the requester waits for
// an answer (code != 0), gives it the error as JetStream gives errors.
func (in *intake) refuse(m *nats.Msg, key events.Key, reason string, code int, description string) {
	in.refused.Add(context.Background(), 1, metric.WithAttributes(attribute.String("reason", reason)))
	in.p.log.Warn("event refused", "subject", m.Subject, "tenant", key.Tenant,
		"reason", reason, "detail", description)
	if code == 0 || m.Reply == "" || !replyAllowed(m.Reply, key.Tenant) {
		return
	}
	b, _ := json.Marshal(struct {
		Error jetstream.APIError `json:"error"`
	}{jetstream.APIError{Code: code, Description: description}})
	_ = m.Respond(b)
}

// replyAllowed reports whether reply is an inbox the requester of tenant
// may receive on: the tenant's own inbox prefix (_INBOX_<tenant>), or the
// NATS default _INBOX, which a deployment without tenant users shares.
// Anything else — a KV key, the JetStream API, another tenant's inbox or
// subjects — would make the refresher write there with its own rights.
func replyAllowed(reply, tenant string) bool {
	if rest, ok := strings.CutPrefix(reply, "_INBOX."); ok && rest != "" {
		return true
	}
	rest, ok := strings.CutPrefix(reply, "_INBOX_"+tenant+".")
	return tenant != "" && ok && rest != ""
}

// tenantLimits is a token bucket per tenant: how many new events (not
// duplicates) a tenant may report per second into the work lane, with a
// burst; beyond that its events go to the slow lane. Buckets that are full
// again are dropped, so the map stays as small as the set of tenants
// reporting right now. Safe for concurrent use.
type tenantLimits struct {
	every rate.Limit
	burst int

	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// tenantLimitsSweep is the size at which full buckets are dropped.
const tenantLimitsSweep = 1024

func newTenantLimits(perSecond float64, burst int) *tenantLimits {
	return &tenantLimits{every: rate.Limit(perSecond), burst: burst, m: map[string]*rate.Limiter{}}
}

func (t *tenantLimits) limiter(tenant string) *rate.Limiter {
	l, ok := t.m[tenant]
	if !ok {
		if len(t.m) >= tenantLimitsSweep {
			for k, v := range t.m {
				if v.Tokens() >= float64(t.burst) {
					delete(t.m, k)
				}
			}
		}
		l = rate.NewLimiter(t.every, t.burst)
		t.m[tenant] = l
	}
	return l
}

// allow charges one event to tenant, and reports false when the tenant is
// over its rate (the event goes to the slow lane).
func (t *tenantLimits) allow(tenant string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.limiter(tenant).Allow()
}

// recentIDs remembers the acknowledgements of the events this intake wrote
// within the stream's duplicate window, so that a storm of duplicates is
// answered without a stream write each. At most size are kept, oldest
// dropped first. Safe for concurrent use.
type recentIDs struct {
	window time.Duration
	size   int

	mu    sync.Mutex
	m     map[string]seenAck
	order []string // insertion order, for expiry and the size bound
}

type seenAck struct {
	ack jetstream.PubAck
	at  time.Time
}

func newRecentIDs(window time.Duration, size int) *recentIDs {
	return &recentIDs{window: window, size: size, m: map[string]seenAck{}}
}

func (r *recentIDs) get(id string) (jetstream.PubAck, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.m[id]
	if !ok || time.Since(s.at) >= r.window {
		return jetstream.PubAck{}, false
	}
	ack := s.ack
	ack.Duplicate = true
	return ack, true
}

func (r *recentIDs) put(id string, ack jetstream.PubAck) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	for len(r.order) > 0 {
		old := r.m[r.order[0]]
		if len(r.order) < r.size && now.Sub(old.at) < r.window {
			break
		}
		delete(r.m, r.order[0])
		r.order = r.order[1:]
	}
	if _, ok := r.m[id]; !ok {
		r.order = append(r.order, id)
	}
	r.m[id] = seenAck{ack: ack, at: now}
}
