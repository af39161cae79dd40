package workers

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
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
	ctx, span := p.tracer.Start(ctx, "send "+string(payload.EventType()), trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.operation.type", "send"),
			attribute.String("messaging.destination.name", subject),
			attribute.String("authbus.credential.key", k.String()),
		))
	data, err := events.Encode(k, p.cfg.Source, payload)
	if err != nil {
		span.End()
		return nil, nil, fmt.Errorf("encode %s for %s: %w", payload.EventType(), k, err)
	}
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
	msg, span, err := p.newEventMsg(ctx, c.Key, events.NeedsReauth{Reason: c.Reason, ErrorDescription: c.Description, Version: c.Version})
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
// at ExpiresAt − lead. The schedule subject holds one pending schedule per
// credential, so this replaces the previous generation's. Failure is logged,
// not fatal: a 401 still refreshes the credential.
func (p *Pool) schedule(ctx context.Context, c *kv.Credential) {
	if c.ExpiresAt.IsZero() {
		return // no expiry: refreshed on 401 only
	}
	at := c.ExpiresAt.Add(-lead(c.ExpiresAt.Sub(c.ReceivedAt)))
	// ScheduleAt is truncated to whole seconds: round up, and never into
	// the past (an already-expired token is refreshed at once).
	at = time.Unix(int64(math.Ceil(float64(at.UnixNano())/1e9)), 0)
	if earliest := time.Now().Add(time.Second).Truncate(time.Second); at.Before(earliest) {
		at = earliest
	}
	data, err := events.Encode(c.Key, p.cfg.Source, events.Expiring{Fingerprint: c.Fingerprint, ExpiresAt: c.ExpiresAt})
	if err == nil {
		msg := nats.NewMsg(p.subj.Schedule(c.Key))
		msg.Data = data
		_, err = p.js.PublishMsg(ctx, msg,
			jetstream.WithScheduleAt(at),
			jetstream.WithScheduleTarget(p.subj.Event(events.TypeExpiring, c.Key)))
	}
	if err != nil {
		p.log.Warn("scheduling the proactive refresh failed; the credential will be refreshed on its next 401",
			"key", c.Key.String(), "error", err)
	}
}

// lead is how long before expiry the proactive refresh runs: 10 % of the
// token's lifetime, clamped to 30s–10m, and never more than half of it.
func lead(lifetime time.Duration) time.Duration {
	l := min(max(lifetime/10, 30*time.Second), 10*time.Minute)
	return min(l, lifetime/2)
}
