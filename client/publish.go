package client

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/telemetry"
)

// Published is the events stream's acknowledgement of a report (auth.401
// or auth.expiring).
type Published struct {
	// Subject is where the report went, such as "auth.401.acme.alice.github".
	Subject string
	// MsgID is its Nats-Msg-Id, "{type}:{key}:{fingerprint}".
	MsgID string
	// Stream and Sequence say where the stream stored it; for a duplicate,
	// where it stored the first report of the same token.
	Stream   string
	Sequence uint64
	// Duplicate: the stream already held a report of the same token within
	// its duplicate window and dropped this one. No refresher sees it; the
	// refresh the first report asked for answers it too.
	Duplicate bool
}

// startSpan starts a producer span for a message to subject, with the OTel
// messaging attributes and the credential key; fp is added when non-empty.
func (w *wire) startSpan(ctx context.Context, name, subject, fp string) (context.Context, trace.Span) {
	attrs := []attribute.KeyValue{
		attribute.String("messaging.system", "nats"),
		attribute.String("messaging.operation.type", "send"),
		attribute.String("messaging.destination.name", subject),
		attribute.String("authbus.credential.key", w.key.String()),
	}
	if fp != "" {
		attrs = append(attrs, attribute.String("authbus.fingerprint", fp))
	}
	return w.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(attrs...))
}

// failSpan marks span as failed; err never holds a token.
func failSpan(span trace.Span, err error) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
}

// publish sends p for the token of fingerprint fp into the events stream,
// with the Nats-Msg-Id that lets the stream drop the same report from other
// goroutines, clients and processes, and waits for the stream's ack. An
// invalid p is refused with an error wrapping events.ErrInvalidEvent.
func (w *wire) publish(ctx context.Context, p events.Payload, fp string) (Published, error) {
	t := p.EventType()
	subject := w.subj.Event(t, w.key)
	res := Published{Subject: subject, MsgID: events.MsgID(t, w.key, fp)}
	ctx, span := w.startSpan(ctx, "send "+string(t), subject, fp)
	defer span.End()
	span.SetAttributes(attribute.String("messaging.message.id", res.MsgID))
	data, err := events.Encode(w.key, w.cfg.source(), p)
	if err != nil {
		err = fmt.Errorf("client: encoding %s for %s: %w", t, w.key, err)
		failSpan(span, err)
		return res, err
	}
	msg := nats.NewMsg(subject)
	msg.Data = data
	msg.Header = telemetry.Inject(ctx, msg.Header)
	ack, err := w.js.PublishMsg(ctx, msg, jetstream.WithMsgID(res.MsgID))
	if err != nil {
		err = w.publishError(subject, err)
		failSpan(span, err)
		return res, err
	}
	res.Stream, res.Sequence, res.Duplicate = ack.Stream, ack.Sequence, ack.Duplicate
	if ack.Duplicate {
		// Someone reported the same token first; the refresh that report
		// asked for answers this one too. No worker sees this message, so
		// no refresh trace can link to it: the span says why.
		span.SetAttributes(attribute.Bool("authbus.duplicate", true))
	}
	return res, nil
}

// publishError explains a failed publish into the events stream.
func (w *wire) publishError(subject string, err error) error {
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse), errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("client: publishing %s: no stream captures it (%v): %w; start a refresher (cmd/refresher), which creates the %s stream, or check the subject prefix",
			subject, err, ErrUnavailable, w.subj.EventsStream())
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		if last := w.nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) {
			return fmt.Errorf("client: publishing %s: no acknowledgement (%v; the connection reports: %v): %w; check the user's publish permissions and its inbox prefix (nats.CustomInboxPrefix(\"_INBOX_<tenant>\"))",
				subject, err, last, ErrUnavailable)
		}
		return fmt.Errorf("client: publishing %s: no acknowledgement in time (%v): %w; check that a refresher created the %s stream and that NATS is healthy",
			subject, err, ErrUnavailable, w.subj.EventsStream())
	default:
		return fmt.Errorf("client: publishing %s: %w: %w; check the NATS connection and the user's publish permissions", subject, err, ErrUnavailable)
	}
}
