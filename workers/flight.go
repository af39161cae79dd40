package workers

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/telemetry"
)

// A flight is a refresh this pool is running under a lease. Events for the
// same credential that reach the pool meanwhile (a storm of runtimes without
// Nats-Msg-Id, or a 401 racing a scheduled refresh) join it: they cost no
// KV read, no lease attempt and no redelivery, they are settled with the
// flight's answer, and the flight's process span links to each of their
// publishes, so one trace shows the refresh and every event it answered.
type flight struct {
	key         events.Key
	fingerprint string // of the generation being refreshed
	span        trace.Span
	msg         jetstream.Msg

	mu     sync.Mutex
	landed bool
	joined []joiner
}

// joiner is an event waiting for a flight's answer.
type joiner struct {
	msg     jetstream.Msg
	attempt uint64
	start   time.Time
}

// takeoff makes f the flight of its key, so that later events about the
// generation with this fingerprint join it. The caller holds the key's lease.
func (p *Pool) takeoff(f *flight, key events.Key, fingerprint string) {
	f.key, f.fingerprint = key, fingerprint
	p.flightsMu.Lock()
	p.flights[key] = f
	p.flightsMu.Unlock()
}

// land ends f: no event joins it any more. It returns the events that did.
func (p *Pool) land(f *flight) []joiner {
	p.flightsMu.Lock()
	if p.flights[f.key] == f {
		delete(p.flights, f.key)
	}
	p.flightsMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.landed = true
	return f.joined
}

// join hands msg to the refresh in flight for its credential, if there is
// one and the event is about the generation being refreshed. It reports
// false, and leaves msg alone, otherwise; process then handles it as usual
// (an event about an older token is answered from the store at once, bad
// input is terminated).
func (p *Pool) join(msg jetstream.Msg, in inbound, attempt uint64, start time.Time) bool {
	if in.ev == nil {
		return false
	}
	p.flightsMu.Lock()
	f := p.flights[in.key]
	p.flightsMu.Unlock()
	if f == nil || in.ev.Fingerprint() != f.fingerprint {
		return false
	}
	link := trace.Link{SpanContext: trace.SpanContextFromContext(telemetry.Extract(context.Background(), msg.Headers()))}
	if id := msg.Headers().Get(jetstream.MsgIDHeader); id != "" {
		link.Attributes = append(link.Attributes, semconv.MessagingMessageID(id))
	}
	f.mu.Lock()
	if f.landed {
		f.mu.Unlock()
		return false
	}
	f.joined = append(f.joined, joiner{msg: msg, attempt: attempt, start: start})
	// Under the lock: the span must not have ended (land runs first).
	f.span.AddLink(link)
	f.mu.Unlock()
	p.log.LogAttrs(trace.ContextWithSpan(context.Background(), f.span), slog.LevelDebug, "event joined the refresh in flight",
		slog.String("subject", in.subject), slog.Uint64("attempt", attempt))
	return true
}

// inProgress tells JetStream that f's own event and every event that joined
// it are still being worked on.
func (f *flight) inProgress() {
	f.mu.Lock()
	msgs := make([]jetstream.Msg, 0, len(f.joined)+1)
	msgs = append(msgs, f.msg)
	for _, j := range f.joined {
		msgs = append(msgs, j.msg)
	}
	f.mu.Unlock()
	for _, m := range msgs {
		_ = m.InProgress()
	}
}

// settleJoined settles the events that joined a flight which came to r.
// A rotation (or a peer's, found on the re-read) and a needs_reauth were
// announced by the flight and answer every event of the credential; after
// anything else each event goes back to the stream to be decided on its own.
func (p *Pool) settleJoined(ctx context.Context, joined []joiner, r result) {
	var jr result
	switch r.outcome {
	case outRotated, outStale:
		jr = ack(outStale)
		jr.detail = "answered by the refresh it joined"
	case outNeedsReauth:
		jr = ack(outNeedsReauth)
		jr.detail = "answered by the refresh it joined"
	default:
		jr = nak(outLeaseHeld, jitter(p.cfg.LeaseWait), fmt.Sprintf("the refresh it joined ended %s", r.outcome))
	}
	jr.version = r.version
	for _, j := range joined {
		p.settle(ctx, j.msg, jr, j.attempt, j.start)
	}
}
