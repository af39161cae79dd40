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

// startSpan starts a producer span for a message to subject, with the OTel
// messaging attributes and the credential key; fp is added when non-empty.
func (s *Source) startSpan(ctx context.Context, name, subject, fp string) (context.Context, trace.Span) {
	attrs := []attribute.KeyValue{
		attribute.String("messaging.system", "nats"),
		attribute.String("messaging.operation.type", "send"),
		attribute.String("messaging.destination.name", subject),
		attribute.String("authbus.credential.key", s.key.String()),
	}
	if fp != "" {
		attrs = append(attrs, attribute.String("authbus.fingerprint", fp))
	}
	return s.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(attrs...))
}

// failSpan marks span as failed; err never holds a token.
func failSpan(span trace.Span, err error) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
}

// publish sends p for the token of fingerprint fp into the events stream,
// with the Nats-Msg-Id that lets the stream drop the same report from other
// goroutines, clients and processes, and waits for the stream's ack.
func (s *Source) publish(ctx context.Context, p events.Payload, fp string) error {
	t := p.EventType()
	subject := s.subj.Event(t, s.key)
	ctx, span := s.startSpan(ctx, "send "+string(t), subject, fp)
	defer span.End()
	data, err := events.Encode(s.key, s.cfg.source(), p)
	if err != nil {
		err = fmt.Errorf("client: encoding %s for %s: %w", t, s.key, err)
		failSpan(span, err)
		return err
	}
	msg := nats.NewMsg(subject)
	msg.Data = data
	msg.Header = telemetry.Inject(ctx, msg.Header)
	ack, err := s.js.PublishMsg(ctx, msg, jetstream.WithMsgID(events.MsgID(t, s.key, fp)))
	if err != nil {
		err = s.publishError(subject, err)
		failSpan(span, err)
		return err
	}
	if ack.Duplicate {
		// Someone reported the same token first; the refresh that report
		// asked for answers this one too. No worker sees this message, so
		// no refresh trace can link to it: the span says why.
		span.SetAttributes(attribute.Bool("authbus.duplicate", true))
	}
	return nil
}

// publishError explains a failed publish into the events stream.
func (s *Source) publishError(subject string, err error) error {
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse), errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("client: publishing %s: no stream captures it (%v): %w; start a refresher (cmd/refresher), which creates the %s stream, or check the subject prefix (WithPrefix)",
			subject, err, ErrUnavailable, s.subj.EventsStream())
	case errors.Is(err, context.Canceled) && s.ctx.Err() != nil:
		return fmt.Errorf("client: publishing %s: %w", subject, ErrClosed)
	default:
		return fmt.Errorf("client: publishing %s: %w: %w; check the NATS connection and the user's publish permissions", subject, err, ErrUnavailable)
	}
}
