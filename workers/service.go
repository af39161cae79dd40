package workers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers/discovery"
)

// Version is the authbus service version announced by `nats micro ls`.
const Version = "0.1.0"

// requestTimeout bounds the KV work of one request.
const requestTimeout = 10 * time.Second

// startService registers the auth.register and auth.token endpoints as a
// NATS micro service. Every refresher joins the same queue group, so each
// request is answered once.
func (p *Pool) startService() (micro.Service, error) {
	svc, err := micro.AddService(p.serve, micro.Config{
		Name:        "authbus",
		Version:     Version,
		Description: "authbus token service: register credentials and read current access tokens",
	})
	if err != nil {
		return nil, fmt.Errorf("start micro service: %w", err)
	}
	// Each endpoint serves its requests concurrently, fairly per tenant
	// (see lanes); token requests are quick, so many more may wait.
	share := max(1, p.cfg.Requests/4)
	register := newLanes("auth.register", p.cfg.Requests, share, 2*share, &p.serving)
	token := newLanes("auth.token", p.cfg.Requests, share, 64*share, &p.serving)
	p.requests = []*lanes{register, token}
	for _, ep := range []struct {
		name, subject string
		h             micro.HandlerFunc
	}{
		{"register", p.subj.RegisterWildcard(), p.concurrently(register, p.traced(p.subj.RegisterWildcard(), p.handleRegister))},
		{"token", p.subj.TokenWildcard(), p.concurrently(token, p.traced(p.subj.TokenWildcard(), p.handleToken))},
	} {
		if err := svc.AddEndpoint(ep.name, ep.h, micro.WithEndpointSubject(ep.subject)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add endpoint %s on %s: %w", ep.name, ep.subject, err)
		}
	}
	return svc, nil
}

// concurrently hands each request to its tenant's lane in l, to be served
// on a goroutine of its own (or refused, 503, when the tenant or the
// refresher is busy). A subject without a credential key is answered at
// once: there is no tenant to queue it for, and the answer is quick.
func (p *Pool) concurrently(l *lanes, h micro.HandlerFunc) micro.HandlerFunc {
	return func(req micro.Request) {
		_, k, err := p.subj.Parse(req.Subject())
		// NATS does not check the reply subject a requester names, and the
		// refresher answers with its own rights: an answer aimed at a KV
		// key, the JetStream API or another tenant's subjects would write
		// there. Answer only on the requester's own inbox (for a subject
		// without a key, only on the default one), and not at all
		// otherwise.
		if !replyAllowed(req.Reply(), k.Tenant) {
			p.log.Warn("request refused: its reply subject is not the requester's inbox", "subject", req.Subject(), "tenant", k.Tenant)
			return
		}
		if err != nil {
			h(req)
			return
		}
		d := detach(p.serve, req)
		l.submit(k.Tenant, job{
			serve: func() { h(d) },
			refuse: func(description string) {
				p.log.Debug("request refused: busy", "subject", d.subject, "reason", description)
				p.replyError(d, events.CodeUnavailable, description, "")
			},
			received: time.Now(),
		})
	}
}

// traced serves a request inside a server span, the child of the
// requester's span when its headers carry one. The span records the error
// code of an error reply; the body, which may hold tokens, only by size.
func (p *Pool) traced(template string, h func(context.Context, micro.Request)) micro.HandlerFunc {
	return func(req micro.Request) {
		ctx := telemetry.Extract(context.Background(), nats.Header(req.Headers()))
		ctx, span := p.tracer.Start(ctx, "process "+template, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(processAttrs(req.Subject(), len(req.Data()), semconv.MessagingDestinationTemplate(template))...))
		defer span.End()
		h(ctx, tracedRequest{Request: req, span: span})
	}
}

// tracedRequest is a request served inside span.
type tracedRequest struct {
	micro.Request
	span trace.Span
}

// fail marks the span of an error reply with the reply's code.
func (r tracedRequest) fail(code string) {
	r.span.SetStatus(codes.Error, code)
	r.span.SetAttributes(semconv.ErrorTypeKey.String(code))
}

// replyError answers with the micro error headers and the same as a JSON body.
func (p *Pool) replyError(req micro.Request, code, description, reason string) {
	if tr, ok := req.(tracedRequest); ok {
		tr.fail(code)
	}
	// Descriptions and reasons may repeat what a server or a requester
	// sent: bounded, and on one line as a header value must be.
	description = events.TruncateText(description, events.MaxErrorDescriptionLen)
	reason = events.TruncateText(reason, events.MaxReasonLen)
	body, _ := json.Marshal(events.ErrorReply{Error: code, ErrorDescription: description, Reason: reason})
	if err := req.Error(events.StatusOf(code), description, body); err != nil {
		p.log.Warn("reply failed", "subject", req.Subject(), "error", err)
	}
}

func (p *Pool) replyJSON(req micro.Request, v any) {
	if err := req.RespondJSON(v); err != nil {
		p.log.Warn("reply failed", "subject", req.Subject(), "error", err)
	}
}

// requestKey takes the credential key from the request subject: the subject
// is what NATS permissions check, so it is authoritative for the tenant.
func (p *Pool) requestKey(ctx context.Context, req micro.Request, word string) (events.Key, bool) {
	w, k, err := p.subj.Parse(req.Subject())
	if err != nil || w != word {
		p.replyError(req, events.CodeInvalidRequest, fmt.Sprintf("subject %q: %v; send to %s.%s.<tenant>.<user>.<server>", req.Subject(), err, p.subj.Prefix(), word), "")
		return events.Key{}, false
	}
	trace.SpanFromContext(ctx).SetAttributes(attrKey.String(k.String()))
	return k, true
}

// handleRegister stores fresh tokens for a credential, first registration or
// repair after a new login, and announces them. It never calls the token
// endpoint.
func (p *Pool) handleRegister(ctx context.Context, req micro.Request) {
	key, ok := p.requestKey(ctx, req, "register")
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	rr, err := events.DecodeRegisterRequest(req.Data())
	if err != nil {
		p.replyError(req, events.CodeInvalidRequest, err.Error(), "")
		return
	}
	if rr.Issuer != "" {
		if !p.discover(ctx, req, &rr) {
			return
		}
	}
	if err := p.cfg.TokenHosts.CheckEndpoint(ctx, rr.TokenEndpoint); err != nil {
		p.replyError(req, events.CodeInvalidRequest, fmt.Sprintf("field \"token_endpoint\": %v", err), "")
		return
	}
	now := time.Now().UTC()
	c := &kv.Credential{
		Key:           key,
		ClientSecret:  kv.Secret(rr.ClientSecret),
		TokenEndpoint: rr.TokenEndpoint,
		ClientID:      rr.ClientID,
		AuthStyle:     rr.AuthStyle,
		Grant:         rr.Grant,
		Scopes:        rr.Scopes,
		Resource:      rr.Resource,
	}
	c.NewGeneration(kv.Tokens{AccessToken: rr.Token.AccessToken, TokenType: rr.Token.TokenType,
		RefreshToken: rr.Token.RefreshToken, ExpiresAt: rr.Token.Expiry(now)}, now)
	if c.AuthStyle == "" {
		c.AuthStyle = events.AuthStyleBasic
	}
	if c.Grant == "" {
		c.Grant = events.GrantRefreshToken
	}

	var (
		wasReauth bool
		stored    uint64
	)
	for attempt := 0; ; attempt++ {
		old, rev, err := p.store.Get(ctx, key)
		switch {
		case errors.Is(err, kv.ErrNotFound):
			c.Version = 1
			stored, err = p.store.Create(ctx, c)
		case err == nil:
			c.Version = old.Version + 1
			wasReauth = old.State == kv.StateNeedsReauth
			stored, err = p.store.Update(ctx, c, rev)
		}
		if err == nil {
			break
		}
		if (errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrExists)) && attempt < 5 {
			continue // a refresh or another registration wrote first: redo on the new revision
		}
		p.log.Warn("register failed", "key", key.String(), "error", err)
		p.replyError(req, events.CodeUnavailable, fmt.Sprintf("storing credential %s failed (%v); retry shortly", key, err), "")
		return
	}
	if err := p.leases.WroteWithout(ctx, key, stored); err != nil {
		p.log.Warn("restating the lease marker after a registration failed; until it expires a refresher reading through a lagging replica may present the replaced refresh token",
			"key", key.String(), "error", err)
	}
	if wasReauth {
		if err := p.reauth.Purge(ctx, jetstream.WithPurgeSubject(p.subj.Event(events.TypeNeedsReauth, key))); err != nil {
			p.log.Warn("purging the kept needs_reauth failed", "key", key.String(), "error", err)
		}
	}
	if err := p.announceRotated(ctx, c); err != nil {
		p.log.Warn("announcing a registration failed", "key", key.String(), "error", err)
	}
	if !c.ExpiresAt.IsZero() || c.Version > 1 {
		// A first registration without expiry has no schedule to replace:
		// its purge would be a stream API request for nothing.
		p.schedule(ctx, c)
	}
	p.log.Info("credential registered", "key", key.String(), "version", c.Version, "fingerprint", c.Fingerprint, "expires_at", c.ExpiresAt)
	p.replyJSON(req, events.RegisterReply{Version: c.Version, Fingerprint: c.Fingerprint, ExpiresAt: c.ExpiresAt})
}

// discover resolves the issuer of a registration to its token endpoint, and
// its auth style when the request sets none, both stored explicitly: refreshes
// then need no discovery, and a wrong issuer is refused while someone waits
// for the answer. It answers the request itself and returns false when
// discovery fails: 503 unavailable when the issuer may recover by itself,
// else 400 invalid_request naming the field issuer.
func (p *Pool) discover(ctx context.Context, req micro.Request, rr *events.RegisterRequest) bool {
	// The metadata fetch is a request to a URL a runtime chose: the same
	// host policy as for token endpoints applies before anything is sent.
	if err := p.cfg.TokenHosts.CheckEndpoint(ctx, rr.Issuer); err != nil {
		p.replyError(req, events.CodeInvalidRequest, fmt.Sprintf("field \"issuer\": %v", err), "")
		return false
	}
	md, err := p.cfg.Discovery.Lookup(ctx, rr.Issuer)
	if err != nil {
		code := events.CodeInvalidRequest
		if errors.Is(err, discovery.ErrIssuerUnavailable) {
			code = events.CodeUnavailable
		}
		p.log.Warn("issuer discovery failed", "subject", req.Subject(), "issuer", rr.Issuer, "error", err)
		p.replyError(req, code, "field \"issuer\": "+err.Error(), "")
		return false
	}
	rr.TokenEndpoint = md.TokenEndpoint
	if rr.AuthStyle == "" {
		rr.AuthStyle = md.AuthStyle()
	}
	return true
}

// handleToken answers with the current access token of a credential.
func (p *Pool) handleToken(ctx context.Context, req micro.Request) {
	key, ok := p.requestKey(ctx, req, "token")
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	c, _, err := p.store.Get(ctx, key)
	switch {
	case errors.Is(err, kv.ErrNotFound):
		p.replyError(req, events.CodeNotFound, fmt.Sprintf("credential %s is not registered; register it on %s", key, p.subj.Register(key)), "")
	case err != nil:
		p.replyError(req, events.CodeUnavailable, fmt.Sprintf("reading credential %s failed (%v); retry shortly", key, err), "")
	case c.State == kv.StateNeedsReauth:
		p.replyError(req, events.CodeNeedsReauth, fmt.Sprintf("credential %s needs a new login (%s): log in again and register the new tokens", key, c.Reason), c.Reason)
	default:
		p.replyJSON(req, rotatedPayload(c))
	}
}
