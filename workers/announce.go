package workers

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
)

// rotatedPayload is what auth.rotated and the auth.token reply carry.
func rotatedPayload(c *kv.Credential) events.Rotated {
	return events.Rotated{
		AccessToken: c.AccessToken.Reveal(),
		TokenType:   c.TokenType,
		ExpiresAt:   c.ExpiresAt,
		Fingerprint: c.Fingerprint,
		Version:     c.Version,
	}
}

// newEventMsg encodes p as a CloudEvent on its subject, with the trace
// context of a new producer span in its headers. The caller ends the span.
func (p *Pool) newEventMsg(ctx context.Context, k events.Key, payload events.Payload) (*nats.Msg, trace.Span, error) {
	subject := p.subj.Event(payload.EventType(), k)
	template := p.subj.EventWildcard(payload.EventType())
	ctx, span := p.tracer.Start(ctx, "send "+template, trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			semconv.MessagingSystemKey.String("nats"),
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName("send"),
			semconv.MessagingDestinationName(subject),
			semconv.MessagingDestinationTemplate(template),
			semconv.CloudEventsEventType(string(payload.EventType())),
			attrKey.String(k.String()),
		))
	data, err := events.Encode(k, p.cfg.Source, payload)
	if err != nil {
		span.End()
		return nil, nil, fmt.Errorf("encode %s for %s: %w", payload.EventType(), k, err)
	}
	span.SetAttributes(semconv.MessagingMessageBodySize(len(data)))
	msg := nats.NewMsg(subject)
	msg.Data = data
	telemetry.Inject(ctx, msg.Header)
	return msg, span, nil
}

// announceRotated publishes the current token of c on core NATS.
func (p *Pool) announceRotated(ctx context.Context, c *kv.Credential) error {
	msg, span, err := p.newEventMsg(ctx, c.Key, rotatedPayload(c))
	if err != nil {
		return err
	}
	defer span.End()
	if err := p.nc.PublishMsg(msg); err != nil {
		return fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return nil
}

// announceNeedsReauth publishes c's needs_reauth into its kept stream.
func (p *Pool) announceNeedsReauth(ctx context.Context, c *kv.Credential) error {
	// Truncated again: a record stored before they were bounded when
	// stored could hold texts that never fit the event.
	msg, span, err := p.newEventMsg(ctx, c.Key, events.NeedsReauth{
		Reason:           events.TruncateText(c.Reason, events.MaxReasonLen),
		ErrorDescription: events.TruncateText(c.Description, events.MaxErrorDescriptionLen),
		Version:          c.Version,
	})
	if err != nil {
		return err
	}
	defer span.End()
	if _, err := p.js.PublishMsg(ctx, msg); err != nil {
		return fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return nil
}

// schedule arranges the proactive refresh of c: an auth.expiring that fires
// in the first half of the lead before ExpiresAt (see Config.RefreshLead).
// The schedule subject holds one pending schedule per credential, so this
// replaces the previous generation's; a token without expiry removes it.
// Failure is logged, not fatal: the reconciler restores a missing schedule
// (see reconcile.go), and a 401 still refreshes the credential.
func (p *Pool) schedule(ctx context.Context, c *kv.Credential) {
	if c.ExpiresAt.IsZero() {
		// No expiry: refreshed on 401 only. An older generation's schedule
		// would fire for a token that no longer exists; drop it.
		if err := p.sched.Purge(ctx, jetstream.WithPurgeSubject(p.subj.Schedule(c.Key))); err != nil {
			p.log.Warn("removing the previous proactive refresh failed; it will fire and be answered as stale",
				"key", c.Key.String(), "error", err)
		}
		p.dropLegacy(ctx, c.Key)
		return
	}
	if err := p.scheduleSync(ctx, c, p.nextAt(c)); err != nil {
		p.scheduleFailed(c, err)
		return
	}
	p.dropLegacy(ctx, c.Key)
}

// scheduleAsync is schedule for the refresh path, at c.ScheduledFor (see
// nextSchedule): the publish ack is checked in the background instead of
// costing the refresh a round trip.
func (p *Pool) scheduleAsync(ctx context.Context, c *kv.Credential) {
	if c.ExpiresAt.IsZero() {
		p.schedule(ctx, c) // the rare purge stays synchronous
		return
	}
	if p.nc.IsClosed() {
		// nats.go starts its async-publish watcher on the first async
		// publish; on a closed connection that goroutine never ends.
		p.log.Warn("not scheduling the proactive refresh: the NATS connection is closed; the credential will be refreshed on its next 401",
			"key", c.Key.String())
		return
	}
	msg, opts, span, err := p.scheduleMsg(ctx, c, c.ScheduledFor)
	if err != nil {
		p.scheduleFailed(c, err)
		return
	}
	ack, err := p.js.PublishMsgAsync(msg, opts...)
	if err != nil {
		span.End()
		p.scheduleFailed(c, err)
		return
	}
	p.bg.Go(func() {
		defer span.End()
		select {
		case <-ack.Ok():
			p.dropLegacy(ctx, c.Key)
		case err := <-ack.Err():
			p.scheduleFailed(c, err)
		}
	})
}

// dropLegacy removes the schedule an earlier version kept for k in the
// events stream (LegacySchedule), once k's schedule is written in the
// schedules stream, so that a credential ends with one. It costs a request
// only while the events stream may hold such schedules (see
// Pool.legacySchedules); failure is logged: a leftover fires once and is
// answered as stale or not due.
func (p *Pool) dropLegacy(ctx context.Context, k events.Key) {
	if !p.legacySchedules.Load() {
		return
	}
	if err := p.work.Purge(ctx, jetstream.WithPurgeSubject(p.subj.LegacySchedule(k))); err != nil {
		p.log.Warn("removing the proactive refresh an earlier version scheduled in the events stream failed; it fires once and is answered as stale",
			"key", k.String(), "error", err)
	}
}

// scheduleFailed logs a schedule that did not make it into the stream.
func (p *Pool) scheduleFailed(c *kv.Credential, err error) {
	p.log.Warn("scheduling the proactive refresh failed; the reconciler restores it (see Config.ReconcileEvery), a 401 refreshes the credential before that",
		"key", c.Key.String(), "error", err)
}

// nextSchedule is when the proactive refresh of c, the generation a
// rotation puts in place of prev, fires, and whether the schedule prev's
// rotation wrote is still pending and fires then, so that none need be
// written. It is, when prev says it fires in the future and no later than
// c's window closes (half the lead before expiry): then it fires for a
// token the credential no longer holds, is answered as stale, and writes
// c's schedule (keepScheduled). In a storm of 401s that spares every
// rotation but the first a replicated write; a proactive refresh, whose
// own schedule has just fired, and a token shorter-lived than the one it
// replaces still write theirs. The cost: when the write of prev's schedule
// failed, no later rotation repairs it, and the reconciler restores it
// (Config.ReconcileEvery).
func (p *Pool) nextSchedule(prev, c *kv.Credential, now time.Time) (at time.Time, pending bool) {
	if c.ExpiresAt.IsZero() {
		return time.Time{}, false
	}
	if s := prev.ScheduledFor; s.After(now) && !s.After(c.ExpiresAt.Add(-p.lead(c)/2)) {
		return s, true
	}
	return p.nextAt(c), false
}

// nextAt is when the proactive refresh of c's current token fires.
func (p *Pool) nextAt(c *kv.Credential) time.Time {
	return scheduleAt(c, p.lead(c), time.Now(), rand.Float64())
}

// scheduleMsg builds the schedule of c's proactive refresh firing at at,
// with the trace context of a new producer span in its headers; the server
// copies them into the auth.expiring it fires, whose process span links to
// this one, and so it does with scheduledForHeader (see scheduleLag). The
// caller ends the span.
func (p *Pool) scheduleMsg(ctx context.Context, c *kv.Credential, at time.Time) (*nats.Msg, []jetstream.PublishOpt, trace.Span, error) {
	data, err := events.Encode(c.Key, p.cfg.Source, events.Expiring{Fingerprint: c.Fingerprint, ExpiresAt: c.ExpiresAt})
	if err != nil {
		return nil, nil, nil, err
	}
	subject, target := p.subj.Schedule(c.Key), p.subj.Due(events.TypeExpiring, c.Key)
	ctx, span := p.tracer.Start(ctx, "send "+p.subj.ScheduleWildcard(), trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			semconv.MessagingSystemKey.String("nats"),
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName("send"),
			semconv.MessagingDestinationName(subject),
			semconv.MessagingDestinationTemplate(p.subj.ScheduleWildcard()),
			semconv.MessagingMessageBodySize(len(data)),
			attrKey.String(c.Key.String()),
			attrScheduleAt.String(at.UTC().Format(time.RFC3339)),
		))
	msg := nats.NewMsg(subject)
	msg.Data = data
	telemetry.Inject(ctx, msg.Header)
	msg.Header.Set(scheduledForHeader, at.UTC().Format(time.RFC3339))
	return msg, []jetstream.PublishOpt{
		jetstream.WithScheduleAt(at),
		jetstream.WithScheduleTarget(target),
	}, span, nil
}

// scheduleAt is when the proactive refresh of c fires: at a point r ∈ [0,1)
// of the first half of the lead, so that the refresh is already due when it
// arrives (see due) and at least half the lead remains before expiry.
// ScheduleAt is truncated to whole seconds, so the time is rounded up, and
// never lies in the past: a token that arrived already expired, or whose
// refresh became due while no refresher ran, is refreshed at once.
func scheduleAt(c *kv.Credential, lead time.Duration, now time.Time, r float64) time.Time {
	at := c.ExpiresAt.Add(-lead + time.Duration(r*float64(lead/2)))
	at = time.Unix(int64(math.Ceil(float64(at.UnixNano())/1e9)), 0)
	if earliest := now.Add(time.Second).Truncate(time.Second); at.Before(earliest) {
		at = earliest
	}
	return at
}

// lead is how long before expiry c is due for its proactive refresh.
func (p *Pool) lead(c *kv.Credential) time.Duration {
	lifetime := c.ExpiresAt.Sub(c.ReceivedAt)
	if p.cfg.RefreshLead > 0 {
		return min(p.cfg.RefreshLead, lifetime/2)
	}
	return events.Lead(lifetime)
}
