package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
)

// ErrInvalidPattern is wrapped by the error Watch returns for a key pattern
// it cannot subscribe to.
var ErrInvalidPattern = errors.New("invalid key pattern")

// watchBuffer is how many events a Watcher holds for Next; beyond it NATS
// drops events for a slow consumer and Next reports it.
const watchBuffer = 256

// Watcher follows the events of the credentials that match its patterns,
// for tools that show or record them (the publisher's watch command, a
// dashboard). A runtime that needs the token of one key keeps a Source
// instead. Create it with Watch; Close it when done. Next may be called
// from one goroutine at a time; Close from any.
type Watcher struct {
	nc       *nats.Conn
	subj     events.Subjects
	subs     []*nats.Subscription
	subjects []string
	msgs     chan *nats.Msg
	done     chan struct{} // closed by Close
	once     sync.Once
}

// Watch subscribes on nc, which it uses but does not own, to the events of
// each type in types for each key pattern. A pattern is a key
// "tenant.user.server" in which a part may be the NATS wildcard "*", or
// whose last part may be ">" (a tenant's keys: "acme.>"; all keys: ">").
// Other patterns are refused with an error wrapping ErrInvalidPattern, so
// a pattern never reaches beyond the key tokens. Of the options only
// WithPrefix and WithRequestTimeout apply.
//
// Watch waits for the server to confirm the subscriptions, so every event
// published after it returns is seen; a subscription the user's
// permissions refuse fails Watch. Tenant users may subscribe to
// auth.rotated and auth.needs_reauth of their own tenant only; auth.rotated
// carries live access tokens.
func Watch(nc *nats.Conn, patterns []string, types []events.Type, opts ...Option) (*Watcher, error) {
	if nc == nil {
		return nil, errors.New("client.Watch: the NATS connection is nil; pass a connected *nats.Conn")
	}
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("client.Watch: %w", err)
	}
	subj, err := events.NewSubjects(cfg.prefix)
	if err != nil {
		return nil, fmt.Errorf("client.Watch: WithPrefix: %w", err)
	}
	if len(patterns) == 0 || len(types) == 0 {
		return nil, fmt.Errorf("client.Watch: give at least one pattern and one event type: %w", ErrInvalidPattern)
	}
	for _, p := range patterns {
		if err := CheckPattern(p); err != nil {
			return nil, fmt.Errorf("client.Watch: %w", err)
		}
	}
	w := &Watcher{nc: nc, subj: subj, msgs: make(chan *nats.Msg, watchBuffer), done: make(chan struct{})}
	for _, p := range patterns {
		for _, t := range types {
			if !t.Valid() {
				w.Close()
				return nil, fmt.Errorf("client.Watch: %q is not an event type; use events.Type401, TypeExpiring, TypeRotated or TypeNeedsReauth", t)
			}
			subject := subj.Prefix() + "." + t.Word() + "." + p
			sub, err := nc.ChanSubscribe(subject, w.msgs)
			if err != nil {
				w.Close()
				return nil, fmt.Errorf("client.Watch: subscribe to %s: %w; check the connection", subject, err)
			}
			w.subs = append(w.subs, sub)
			w.subjects = append(w.subjects, subject)
		}
	}
	// A refused subscription arrives as an asynchronous error; the flush
	// round trip makes it show up now.
	if err := nc.FlushTimeout(cfg.requestTimeout); err != nil {
		w.Close()
		return nil, fmt.Errorf("client.Watch: confirming the subscriptions: %w; check that the NATS connection is up", err)
	}
	if err := nc.LastError(); errors.Is(err, nats.ErrPermissionViolation) {
		w.Close()
		return nil, fmt.Errorf("client.Watch: subscribe to %s: %w; check the NATS user's subscribe permissions", strings.Join(w.subjects, " "), err)
	}
	return w, nil
}

// CheckPattern returns nil for a key pattern Watch accepts, and otherwise
// an error wrapping ErrInvalidPattern that says what a pattern looks like.
func CheckPattern(p string) error {
	parts := strings.Split(p, ".")
	ok := len(parts) <= 3
	for i, part := range parts {
		switch {
		case part == "*":
		case part == ">":
			ok = ok && i == len(parts)-1
		default:
			_, err := events.NewKey(part, "x", "x")
			ok = ok && err == nil
		}
	}
	if !ok || (len(parts) < 3 && parts[len(parts)-1] != ">") {
		return fmt.Errorf("pattern %q: want a key tenant.user.server, where a part may be * and the last part >, such as acme.*.github or acme.>; each other part [A-Za-z0-9_-]{1,64}: %w", p, ErrInvalidPattern)
	}
	return nil
}

// Subjects returns the subjects the Watcher subscribed to.
func (w *Watcher) Subjects() []string { return append([]string(nil), w.subjects...) }

// Next returns the next event, decoded and validated, in the order NATS
// delivered them; the key is its Subject. An event that breaks the protocol
// is returned as an error wrapping events.ErrInvalidEvent (or
// events.ErrInvalidSubject) that names its subject: log it and call Next
// again. Next returns ctx's error when ctx ends first, and one wrapping
// ErrClosed after Close.
func (w *Watcher) Next(ctx context.Context) (*events.Event, error) {
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-w.done:
		return nil, fmt.Errorf("client: watching events: %w", ErrClosed)
	case m := <-w.msgs:
		t, k, err := w.subj.ParseEvent(m.Subject)
		if err != nil {
			return nil, err
		}
		ev, err := events.Decode(t, k, m.Data)
		if err != nil {
			return nil, fmt.Errorf("event on %s: %w", m.Subject, err)
		}
		return ev, nil
	}
}

// Close unsubscribes. Events already received are dropped; Next then
// returns ErrClosed. It does not close the connection. It is safe to call
// more than once.
func (w *Watcher) Close() error {
	var errs []error
	w.once.Do(func() {
		close(w.done)
		for _, sub := range w.subs {
			if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
				errs = append(errs, fmt.Errorf("unsubscribe %s: %w", sub.Subject, err))
			}
		}
	})
	return errors.Join(errs...)
}
