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
	"github.com/authbus/authbus/kv"
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
	lease       *kv.Lease

	mu       sync.Mutex
	landed   bool
	joined   []joiner
	progress *time.Timer // the next in-progress report (see keepInProgress)
	lostSeen bool        // the lease's loss was logged
}

// joiner is an event waiting for a flight's answer.
type joiner struct {
	msg     jetstream.Msg
	attempt uint64
	start   time.Time
}

// takeoff makes f the flight of its key, so that later events about the
// generation with this fingerprint join it, and starts reporting its events
// in progress. The caller holds the key's lease.
func (p *Pool) takeoff(f *flight, key events.Key, fingerprint string, lease *kv.Lease) {
	f.key, f.fingerprint, f.lease = key, fingerprint, lease
	p.flightsMu.Lock()
	p.flights[key] = f
	p.flightsMu.Unlock()
	p.keepInProgress(f)
}

// keepInProgress tells JetStream every progressEvery, until f lands,
// that f's own event and every event that joined it are still being worked
// on, so that a slow token endpoint or a slow store costs no redelivery
// (another worker claiming the lease would present the refresh token just
// redeemed). It also logs, once, when f's lease was lost meanwhile.
func (p *Pool) keepInProgress(f *flight) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.landed {
		return
	}
	f.progress = time.AfterFunc(p.cfg.progressEvery(), func() {
		f.inProgress()
		select {
		case <-f.lease.Done():
			f.mu.Lock()
			first := f.lease.Lost() && !f.lostSeen
			f.lostSeen = true
			f.mu.Unlock()
			if first {
				p.log.Warn("lease lost during a refresh; its result is stored under compare-and-set only", "key", f.key.String())
			}
		default:
		}
		p.keepInProgress(f)
	})
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
	if f.progress != nil {
		f.progress.Stop()
	}
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

// settleJoined settles the events that joined a flight which came to r,
// as r's row in outcomes says: a rotation (or a peer's, found by the fence)
// and a needs_reauth were announced by the flight and answer every event
// of the credential; after anything else each event goes back to the
// stream to be decided on its own.
func (p *Pool) settleJoined(ctx context.Context, joined []joiner, r result) {
	var jr result
	switch outcomes[r.outcome].joined {
	case joinedAnswered:
		jr = answered(outStale, r.version)
		jr.detail = "answered by the refresh it joined"
	case joinedReauth:
		jr = answered(outNeedsReauth, r.version)
		jr.detail = "answered by the refresh it joined"
	default:
		jr = resultOf(outRequeued, jitter(p.cfg.LeaseWait), fmt.Sprintf("the refresh it joined ended %s", r.outcome))
	}
	for _, j := range joined {
		p.settle(ctx, j.msg, jr, j.attempt, j.start)
	}
}
