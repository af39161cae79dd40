package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/telemetry"
)

// wire is what every use of the protocol for one key needs: the caller's
// connection, the key's subjects and the options. A Source holds one;
// FetchToken makes one for a single request.
type wire struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	key    events.Key
	subj   events.Subjects
	cfg    config
	tracer trace.Tracer
}

// newWire checks the connection, the key and the options; what names the
// error (such as "client.New") comes first in its text.
func newWire(what string, nc *nats.Conn, key string, opts []Option) (wire, error) {
	if nc == nil {
		return wire{}, fmt.Errorf("%s: the NATS connection is nil; pass a connected *nats.Conn", what)
	}
	k, err := events.ParseKey(key)
	if err != nil {
		return wire{}, fmt.Errorf("%s: %w", what, err)
	}
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return wire{}, fmt.Errorf("%s: %w", what, err)
	}
	subj, err := events.NewSubjects(cfg.prefix)
	if err != nil {
		return wire{}, fmt.Errorf("%s: WithPrefix: %w", what, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return wire{}, fmt.Errorf("%s: jetstream: %w", what, err)
	}
	return wire{nc: nc, js: js, key: k, subj: subj, cfg: cfg, tracer: otel.Tracer(tracerName)}, nil
}

// FetchToken asks the token service once for the current token of key
// ("tenant.user.server") and returns its answer: the auth.token reply,
// with the access token, its type, expiry, fingerprint and version. It
// subscribes to nothing and keeps nothing, so it suits a one-shot tool (a
// CLI printing a token, a health check); a runtime that sends requests
// keeps a Source instead, which answers from a local copy.
//
// The request is bounded by ctx and by WithRequestTimeout; of the options,
// WithPrefix and WithRequestTimeout apply. Errors: a *NeedsReauthError
// (Version 0: the reply carries none), or errors wrapping ErrNotFound,
// ErrUnavailable or ErrRefused, or ctx's error. It is safe for concurrent
// use.
func FetchToken(ctx context.Context, nc *nats.Conn, key string, opts ...Option) (events.Rotated, error) {
	w, err := newWire("client.FetchToken", nc, key, opts)
	if err != nil {
		return events.Rotated{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.requestTimeout)
	defer cancel()
	r, err := w.askToken(ctx)
	if err != nil {
		return events.Rotated{}, err
	}
	return *r, nil
}

// askToken sends one auth.token request. A needs_reauth answer is returned
// as a *NeedsReauthError of Version 0 (the reply carries no version).
func (w *wire) askToken(ctx context.Context) (*events.Rotated, error) {
	subject := w.subj.Token(w.key)
	ctx, span := w.startSpan(ctx, "send auth.token", subject, "")
	defer span.End()
	msg := nats.NewMsg(subject)
	msg.Header = telemetry.Inject(ctx, msg.Header)
	reply, err := w.nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		err = w.requestError(err)
		failSpan(span, err)
		return nil, err
	}
	if status := reply.Header.Get(micro.ErrorCodeHeader); status != "" {
		err := w.replyError(reply, status)
		var nre *NeedsReauthError
		if !errors.As(err, &nre) {
			failSpan(span, err)
		}
		return nil, err
	}
	ev := new(events.Rotated)
	// Not "if err := …": a shadowed err would drop the verdict and return
	// a malformed reply as the token.
	if err = json.Unmarshal(reply.Data, ev); err == nil {
		err = ev.Validate()
	}
	if err != nil {
		err = fmt.Errorf("client: the auth.token reply for %s is malformed (%v); check that the refreshers speak this protocol version: %w", w.key, err, ErrUnavailable)
		failSpan(span, err)
		return nil, err
	}
	return ev, nil
}

// requestError explains a failed auth.token request.
func (w *wire) requestError(err error) error {
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("client: no refresher answers on %s: %w; start one (cmd/refresher) on this NATS deployment, or check the subject prefix", w.subj.Token(w.key), ErrUnavailable)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		if last := w.nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) {
			return fmt.Errorf("client: no answer from %s (%v; the connection reports: %v): %w; check the user's permissions for the subject and its inbox prefix (nats.CustomInboxPrefix(\"_INBOX_<tenant>\"))",
				w.subj.Token(w.key), err, last, ErrUnavailable)
		}
		return fmt.Errorf("client: no answer from %s in time (%v): %w; check the refreshers, and the user's permissions for the subject and its inbox prefix (a denied request looks like a timeout)",
			w.subj.Token(w.key), err, ErrUnavailable)
	default:
		return fmt.Errorf("client: requesting %s: %w: %w", w.subj.Token(w.key), err, ErrUnavailable)
	}
}

// replyError turns an error reply into an error; a needs_reauth answer
// becomes a *NeedsReauthError of Version 0.
func (w *wire) replyError(reply *nats.Msg, status string) error {
	var body events.ErrorReply
	_ = json.Unmarshal(reply.Data, &body) // the headers alone are enough
	desc := body.ErrorDescription
	if desc == "" {
		desc = reply.Header.Get(micro.ErrorHeader)
	}
	code := events.CodeOf(status)
	switch code {
	case events.CodeNotFound:
		return fmt.Errorf("client: token for %s: %s: %s: %w", w.key, code, desc, ErrNotFound)
	case events.CodeNeedsReauth:
		reason := body.Reason
		if reason == "" {
			reason = "unknown"
		}
		return &NeedsReauthError{Key: w.key.String(), Reason: reason}
	case events.CodeInvalidRequest, events.CodeForbidden:
		return fmt.Errorf("client: token for %s: the service answered %s (%s): %w", w.key, status, desc, ErrRefused)
	default:
		return fmt.Errorf("client: token for %s: the service answered %s (%s): %w; retry later", w.key, status, desc, ErrUnavailable)
	}
}
