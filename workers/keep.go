package workers

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// Schedules are never lost: an active credential with an expiry has one
// pending proactive refresh on its schedule subject until it needs re-auth
// or is deleted. Registration and every rotation write the next one
// (announce.go); this file covers the other ways an auth.expiring can end:
//
//   - the token endpoint's breaker refuses the refresh: the event is
//     parked, acked once the credential's schedule is written again for
//     after the breaker half-opens, however long the outage lasts;
//   - the event gives up after MaxDeliver deliveries: the next attempt is
//     scheduled before it is terminated;
//   - a schedule fired for a token the credential no longer holds (stale)
//     or before the refresh was due (not_due): the current token's
//     schedule is written, since a write that raced a rotation may have
//     replaced the newer one.
//
// What is still missing (a crash between a store and its schedule, a
// schedule publish that failed) the reconciler restores (reconcile.go).
// When a breaker closes again, the credentials this pool parked behind it
// are released at once, tokens that can still be saved first (release).

// scheduledForHeader carries the time a schedule was written to fire. The
// server copies a schedule's headers into the auth.expiring it fires (it
// strips only its own Nats-Schedule* ones), so the pool can tell how late a
// proactive refresh arrived (scheduleLag).
const scheduledForHeader = "Authbus-Scheduled-For"

// maxParked bounds the credentials one pool remembers for release: about
// 200 bytes each. A credential parked beyond it is not lost, only not
// released early: its schedule fires at its parked time.
const maxParked = 200_000

// keeper is the pool's part in keeping schedules: the credentials parked
// behind open breakers, and the instruments that show the schedules'
// health. Safe for concurrent use.
type keeper struct {
	lag      metric.Float64Histogram // authbus.schedule.lag
	restored metric.Int64Counter     // authbus.schedules.restored{reason}

	mu     sync.Mutex
	seed   maphash.Seed                         // of quiet
	quiet  []uint64                             // credentials that need no schedule, by key and revision (reconcile.go)
	parked map[string]map[events.Key]parkedCred // by token endpoint
	n      int                                  // entries in parked
	closed map[string]bool                      // endpoints whose breaker closed since the last release
	wake   chan struct{}                        // one pending release signal
}

// parkedCred is what a release needs to write a credential's schedule
// without reading it again.
type parkedCred struct {
	fingerprint           string
	expiresAt, receivedAt time.Time
}

// lagBounds (seconds) resolve a schedule that fires on time (the server
// fires schedules in passes at most every 250 ms) up to minutes late.
var lagBounds = []float64{0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300}

func newKeeper(mp metric.MeterProvider) (*keeper, error) {
	m := mp.Meter(instrumentationName, metric.WithInstrumentationVersion(Version))
	k := &keeper{seed: maphash.MakeSeed(), parked: map[string]map[events.Key]parkedCred{}, closed: map[string]bool{}, wake: make(chan struct{}, 1)}
	var err1, err2 error
	k.lag, err1 = m.Float64Histogram("authbus.schedule.lag", metric.WithUnit("s"),
		metric.WithDescription("how late a scheduled auth.expiring reached a refresher: first delivery minus the time its schedule was written for"),
		metric.WithExplicitBucketBoundaries(lagBounds...))
	k.restored, err2 = m.Int64Counter("authbus.schedules.restored", metric.WithUnit("{schedule}"),
		metric.WithDescription("proactive-refresh schedules written outside a rotation or registration, by reason (parked, gave_up, stale, not_due, released, reconciled)"))
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("pool metrics: %w", err)
	}
	return k, nil
}

// count records a schedule written for reason.
func (k *keeper) count(ctx context.Context, reason string, n int) {
	k.restored.Add(ctx, int64(n), metric.WithAttributes(attribute.String("reason", reason)))
}

// scheduleLag records and returns how late the first delivery of a
// scheduler-fired event arrived; ok is false for any other delivery.
func (p *Pool) scheduleLag(ctx context.Context, msg jetstream.Msg, attempt uint64, received time.Time) (lag time.Duration, ok bool) {
	if attempt != 1 || msg.Headers().Get(jetstream.SchedulerHeader) == "" {
		return 0, false
	}
	due, err := time.Parse(time.RFC3339, msg.Headers().Get(scheduledForHeader))
	if err != nil {
		return 0, false // written by a refresher before the header existed
	}
	lag = received.Sub(due)
	p.keeper.lag.Record(ctx, lag.Seconds())
	return lag, true
}

// givesUp reports whether settling r at this delivery terminates the
// event: a retry at the last delivery MaxDeliver allows.
func (p *Pool) givesUp(r result, attempt uint64) bool {
	return r.action == actionNak && attempt >= uint64(p.cfg.MaxDeliver)
}

// keepScheduled is the last step for an auth.expiring before it is
// settled: whatever res says, the credential keeps one pending proactive
// refresh. It returns how to settle the event. A 401 is left alone: the
// runtime that saw it reports it again, and its credential's schedule is
// its own.
func (r *refresh) keepScheduled(ctx context.Context, res result) result {
	p := r.p
	if r.in.typ != events.TypeExpiring || r.ev == nil {
		return res
	}
	if res.outcome != outBreakerOpen {
		p.keeper.forget(r.in.key)
	}
	fired := r.f != nil && r.f.msg.Headers().Get(jetstream.SchedulerHeader) != ""
	switch {
	case res.outcome == outBreakerOpen:
		return r.park(ctx, res)
	case p.givesUp(res, r.attempt):
		at := wholeSecond(time.Now().Add(max(res.delay, time.Second)))
		if err := r.reschedule(ctx, at); err != nil {
			res.detail += "; the next attempt could not be scheduled (the reconciler restores it): " + err.Error()
		} else {
			res.detail += "; next attempt scheduled for " + at.UTC().Format(time.RFC3339)
			p.keeper.count(ctx, "gave_up", 1)
		}
	case fired && (res.outcome == outStale || res.outcome == outNotDue):
		if c := r.cred; c != nil && c.State == kv.StateActive && !c.ExpiresAt.IsZero() {
			if err := p.scheduleSync(ctx, c, p.nextAt(c)); err != nil {
				p.scheduleFailed(c, err)
			} else {
				p.keeper.count(ctx, res.outcome.String(), 1)
			}
		}
	}
	return res
}

// park answers an auth.expiring whose refresh the token endpoint's open
// breaker refused: the credential's schedule is written again to fire after
// the breaker half-opens, and the event is acked. Naks would end the event
// at MaxDeliver in an outage longer than MaxDeliver half-open intervals,
// and a consumer scans all of its pending messages whenever a nak delay
// expires: with a whole fleet waiting that costs the server more than the
// schedules, which it keeps in a timing wheel. If the schedule cannot be
// written, res stands (the event is redelivered).
func (r *refresh) park(ctx context.Context, res result) result {
	p, c := r.p, r.cred
	if c == nil || c.State != kv.StateActive || c.ExpiresAt.IsZero() {
		return res
	}
	at := p.parkAt(time.Now())
	if err := p.scheduleSync(ctx, c, at); err != nil {
		p.log.Warn("parking a proactive refresh behind the open breaker failed; the event is redelivered instead", "key", c.Key.String(), "error", err)
		return res
	}
	p.keeper.add(c)
	p.keeper.count(ctx, "parked", 1)
	return resultOf(outParked, 0, "token endpoint breaker open; proactive refresh rescheduled for "+at.UTC().Format(time.RFC3339))
}

// parkAt is when a parked credential tries again: after the breaker
// half-opens (BreakerOpenFor), spread over half an interval more so the
// waiting credentials do not return in the same second, and so that each
// half-open interval finds one of them to probe with.
func (p *Pool) parkAt(now time.Time) time.Time {
	d := p.cfg.BreakerOpenFor
	return wholeSecond(now.Add(d + rand.N(d/2+1)))
}

// reschedule writes the schedule of the credential's next attempt at at,
// reading the credential when step 2 could not.
func (r *refresh) reschedule(ctx context.Context, at time.Time) error {
	c := r.cred
	if c == nil {
		var err error
		if c, _, err = r.p.store.Get(ctx, r.in.key); err != nil {
			if errors.Is(err, kv.ErrNotFound) {
				return nil // deleted: nothing to schedule
			}
			return err
		}
	}
	if c.State != kv.StateActive || c.ExpiresAt.IsZero() {
		return nil
	}
	return r.p.scheduleSync(ctx, c, at)
}

// scheduleSync writes c's schedule to fire at at and waits for the
// stream's ack.
func (p *Pool) scheduleSync(ctx context.Context, c *kv.Credential, at time.Time) error {
	msg, opts, span, err := p.scheduleMsg(ctx, c, at)
	if err != nil {
		return err
	}
	defer span.End()
	if _, err := p.js.PublishMsg(ctx, msg, opts...); err != nil {
		return fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return nil
}

// wholeSecond rounds t up to a whole second: the server truncates
// ScheduleAt, which would fire a schedule early.
func wholeSecond(t time.Time) time.Time {
	if r := t.Truncate(time.Second); !r.Equal(t) {
		return r.Add(time.Second)
	}
	return t
}

// add remembers c as parked behind its endpoint's breaker.
func (k *keeper) add(c *kv.Credential) {
	k.mu.Lock()
	defer k.mu.Unlock()
	set := k.parked[c.TokenEndpoint]
	if set == nil {
		set = map[events.Key]parkedCred{}
		k.parked[c.TokenEndpoint] = set
	}
	if _, ok := set[c.Key]; !ok {
		if k.n >= maxParked {
			return
		}
		k.n++
	}
	set[c.Key] = parkedCred{fingerprint: c.Fingerprint, expiresAt: c.ExpiresAt, receivedAt: c.ReceivedAt}
}

// forget drops key from the parked credentials: its event came to
// something other than the breaker.
func (k *keeper) forget(key events.Key) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.n == 0 {
		return
	}
	for _, set := range k.parked {
		if _, ok := set[key]; ok {
			delete(set, key)
			k.n--
		}
	}
}

// breakerChanged is the breakers' state-change hook: a breaker that closes
// after a successful half-open probe releases what was parked behind it.
// It runs under the breaker's lock, so it only leaves a signal.
func (k *keeper) breakerChanged(endpoint string, from, to gobreaker.State) {
	if from != gobreaker.StateHalfOpen || to != gobreaker.StateClosed {
		return
	}
	k.mu.Lock()
	k.closed[endpoint] = true
	k.mu.Unlock()
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// takeClosed returns and forgets the parked credentials of every endpoint
// whose breaker closed since the last call.
func (k *keeper) takeClosed() map[string]map[events.Key]parkedCred {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := map[string]map[events.Key]parkedCred{}
	for endpoint := range k.closed {
		if set := k.parked[endpoint]; len(set) > 0 {
			out[endpoint] = set
			k.n -= len(set)
		}
		delete(k.parked, endpoint)
	}
	clear(k.closed)
	return out
}

// releaseParked runs until ctx ends, releasing the credentials parked
// behind a breaker each time it closes.
func (p *Pool) releaseParked(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.keeper.wake:
		}
		for endpoint, set := range p.keeper.takeClosed() {
			p.release(ctx, endpoint, set)
		}
	}
}

// releaseBatch is how many schedules a release publishes before it waits
// for their acks: below nats.go's limit of pending async publishes.
const releaseBatch = 1000

// release writes the schedules of credentials parked behind endpoint's
// breaker, which just closed, to fire at once: tokens that have not expired
// yet first, the earliest expiry first, then the expired ones. The server
// fires the schedules of one second in the order they were written and the
// consumer hands them out in stream order, so the refreshes follow that
// order; the workers' concurrency paces them, not the waiting credentials.
// Other pools release what they parked when their own breaker closes; a
// credential no pool releases fires at its parked time.
func (p *Pool) release(ctx context.Context, endpoint string, set map[events.Key]parkedCred) {
	start := time.Now()
	type item struct {
		key events.Key
		parkedCred
	}
	items := make([]item, 0, len(set))
	for key, pc := range set {
		items = append(items, item{key, pc})
	}
	slices.SortFunc(items, func(a, b item) int {
		if ea, eb := !a.expiresAt.After(start), !b.expiresAt.After(start); ea != eb {
			if ea {
				return 1
			}
			return -1
		}
		return a.expiresAt.Compare(b.expiresAt)
	})
	written, failed := 0, 0
	var acks []jetstream.PubAckFuture
	wait := func() {
		for _, a := range acks {
			select {
			case <-a.Ok():
				written++
			case <-a.Err():
				failed++
			case <-ctx.Done():
				return
			}
		}
		acks = acks[:0]
	}
	for _, it := range items {
		if ctx.Err() != nil || p.nc.IsClosed() {
			// nats.go starts its async-publish watcher on the first async
			// publish; on a closed connection that goroutine never ends.
			break
		}
		c := &kv.Credential{Key: it.key, Fingerprint: it.fingerprint, ExpiresAt: it.expiresAt, ReceivedAt: it.receivedAt}
		msg, opts, span, err := p.scheduleMsg(ctx, c, wholeSecond(time.Now()))
		if err == nil {
			var ack jetstream.PubAckFuture
			if ack, err = p.js.PublishMsgAsync(msg, opts...); err == nil {
				acks = append(acks, ack)
			}
		}
		if span != nil {
			span.End()
		}
		if err != nil {
			failed++
		}
		if len(acks) == releaseBatch {
			wait()
		}
	}
	wait()
	p.keeper.count(ctx, "released", written)
	p.log.Info("token endpoint answers again: parked proactive refreshes released, earliest expiry first",
		"endpoint", redactURL(endpoint), "released", written, "failed", failed, "took", time.Since(start))
}
