package workers

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// refresh is one event's trip through the seven steps of a refresh (the
// algorithm docs/operations.md describes): what each step learned, for the
// steps after it. Run it with Pool.refresh; each method below is one step,
// in order.
type refresh struct {
	p       *Pool
	in      inbound
	attempt uint64
	f       *flight // the credential's flight, once the lease is held

	ev    *events.Event
	cred  *kv.Credential // as read in step 2, then as fenced in step 3
	read  kv.Read        // step 2's read, for the claim
	rev   uint64         // the revision cred was read at (step 3's fence)
	lease *kv.Lease
}

// refresh runs steps 1–7 for one event and returns how to settle it. The
// lease, once claimed, is released after the caller settled the event.
// Whatever the outcome, an auth.expiring leaves its credential with a
// pending proactive refresh (keepScheduled).
func (p *Pool) refresh(ctx context.Context, in inbound, attempt uint64, f *flight) (res result) {
	r := &refresh{p: p, in: in, attempt: attempt, f: f}
	defer func() { res = r.keepScheduled(ctx, res) }()
	if res, done := r.validate(ctx); done { // 1
		return res
	}
	if res, done := r.load(ctx); done { // 2
		return res
	}
	res, done := r.claim(ctx) // 3
	if r.lease != nil {
		defer r.release(ctx) // 7, once the event is settled
	}
	if done {
		return res
	}
	tok, err := r.call(ctx)          // 4
	return r.classify(ctx, tok, err) // 5, 6, 7
}

// validate is step 1: the event was parsed and validated on receipt (so
// that it can join a flight without a second decode); bad input is
// terminated with the reason.
func (r *refresh) validate(ctx context.Context) (result, bool) {
	span := trace.SpanFromContext(ctx)
	if r.in.named {
		span.SetName("process " + r.p.subj.EventWildcard(r.in.typ))
		span.SetAttributes(semconv.MessagingDestinationTemplate(r.p.subj.EventWildcard(r.in.typ)), attrKey.String(r.in.key.String()))
	}
	if r.in.ev == nil {
		return resultOf(outBadInput, 0, r.in.refused), true
	}
	r.ev = r.in.ev
	span.SetAttributes(attrFingerprint.String(r.ev.Fingerprint()),
		semconv.CloudEventsEventID(r.ev.ID), semconv.CloudEventsEventSource(r.ev.Source),
		semconv.CloudEventsEventType(string(r.ev.Type)), semconv.CloudEventsEventSpecVersion(r.ev.SpecVersion))
	return result{}, false
}

// load is step 2: read the credential and decide without a lease when the
// stored record answers the event (stale, needs_reauth, not due); most
// events of a storm end here. This read is a direct get any replica may
// answer: step 3 fences it before a refresh token is presented, and an
// event it would turn away is judged again on the leader's record.
func (r *refresh) load(ctx context.Context) (result, bool) {
	var err error
	r.cred, r.read, err = r.p.store.Load(ctx, r.in.key)
	if errors.Is(err, kv.ErrNotFound) {
		return resultOf(outUnknownCred, 0, fmt.Sprintf("credential %s is not registered; register it first", r.in.key)), true
	}
	if err != nil {
		return resultOf(outNATS, r.p.backoff(r.attempt), err.Error()), true
	}
	if o := r.p.verdict(r.ev, r.cred, time.Now()); (o == outStale || o == outNeedsReauth) && !r.read.Current() {
		// A replica may lag: the event may be about a token newer than
		// the one it showed, which would make the runtime's genuine 401
		// look stale and drop it. Only the leader's record turns it away.
		r.cred, r.read, err = r.p.store.LoadLatest(ctx, r.in.key)
		if errors.Is(err, kv.ErrNotFound) {
			return resultOf(outUnknownCred, 0, fmt.Sprintf("credential %s is not registered; register it first", r.in.key)), true
		}
		if err != nil {
			return resultOf(outNATS, r.p.backoff(r.attempt), err.Error()), true
		}
	}
	r.rev = r.read.Revision
	if res, done := r.p.decide(ctx, r.ev, r.cred); done {
		return res, true
	}
	if r.p.breakers.open(breakerKeyOf(r.cred)) {
		return resultOf(outBreakerOpen, r.p.breakerWait(), "token endpoint breaker open"), true
	}
	return result{}, false
}

// claim is step 3: take the credential's lease, then fence the read of
// step 2. A peer may have rotated and released between that read and the
// claim; presenting the refresh token read before it would be a reuse. The
// store hands back a record every write made under a lease is in (the
// read itself when the claim proves it current, else the latest from the
// stream leader), and the event is decided again when it changed.
func (r *refresh) claim(ctx context.Context) (result, bool) {
	p, key := r.p, r.in.key
	cctx, span := p.tracer.Start(ctx, "lease claim", trace.WithAttributes(attrKey.String(key.String())))
	lease, err := p.leases.Claim(cctx, key, p.cfg.Instance, r.read)
	switch {
	case errors.Is(err, kv.ErrLeaseHeld):
		// Not an error of this span: contention is the lease working.
		span.SetAttributes(attrLeaseHeld.Bool(true))
		p.metrics.contention.Add(cctx, 1)
	case err != nil:
		span.SetStatus(codes.Error, err.Error())
	default:
		span.SetAttributes(attrLeaseHeld.Bool(false), attrLeaseRevision.Int64(int64(lease.Revision())))
	}
	span.End()
	if errors.Is(err, kv.ErrLeaseHeld) {
		return resultOf(outLeaseHeld, jitter(p.cfg.LeaseWait), ""), true
	}
	if err != nil {
		return resultOf(outNATS, p.backoff(r.attempt), err.Error()), true
	}
	r.lease = lease
	p.takeoff(r.f, key, r.cred.Fingerprint, lease)

	read := r.rev
	r.cred, r.rev, err = p.store.Fence(ctx, lease, r.cred)
	if errors.Is(err, kv.ErrNotFound) {
		return resultOf(outUnknownCred, 0, fmt.Sprintf("credential %s was deleted", key)), true
	}
	if err != nil {
		return resultOf(outNATS, p.backoff(r.attempt), err.Error()), true
	}
	if r.rev != read {
		if res, done := p.decide(ctx, r.ev, r.cred); done {
			return res, true
		}
	}
	if r.cred.Grant != events.GrantClientCredentials && r.cred.RefreshToken.IsZero() {
		return r.needsReauth(ctx, "no_refresh_token",
			"the credential was registered without a refresh token; log in again and register the new tokens"), true
	}
	return result{}, false
}

// call is step 4: the one token-endpoint call, through the endpoint's
// breaker, bounded by the token timeout. The lease renews itself and the
// flight reports progress meanwhile, so neither a slow token endpoint nor a
// slow store costs the lease or a redelivery (another worker claiming it
// would present the refresh token just redeemed).
func (r *refresh) call(ctx context.Context) (*oauth2.Token, error) {
	return r.p.exchange(ctx, r.cred)
}

// classify is step 5: what the answer means (see classify.go), and the
// step each meaning leads to.
func (r *refresh) classify(ctx context.Context, tok *oauth2.Token, err error) result {
	a := classify(err)
	switch a.verdict {
	case rotated:
		return r.storeRotation(ctx, tok)
	case permanent:
		if !r.lease.Trusted(time.Now()) {
			// Another worker may hold the lease and be storing a newer
			// token right now: a needs_reauth written under CAS could win
			// and make it discard that token. Decide again later.
			return resultOf(outLeaseLost, jitter(r.p.cfg.LeaseWait), "lease lost during the token-endpoint call")
		}
		return r.permanentFailure(ctx, a)
	case breakerOpen:
		return resultOf(outBreakerOpen, r.p.breakerWait(), "token endpoint breaker open")
	case canceled:
		return resultOf(outCanceled, 0, "refresh canceled by shutdown")
	default:
		delay := min(a.retryAfter, maxRetryAfter)
		if delay == 0 {
			delay = r.p.backoff(r.attempt)
		}
		return r.transientFailure(ctx, failureCause(err, a, r.cred, r.p.cfg.TokenTimeout), delay)
	}
}

// transientFailure is step 6 for an answer that a retry may fix: the cause
// and the pending retry are noted for status, which shows them while the
// state still says active, and the event goes back to the stream for the
// retry. The note goes to the failure bucket, not the record: it must not
// bump the record's revision under a refresh in flight. Noting is bounded
// and best effort: only what a person sees is lost when it fails.
func (r *refresh) transientFailure(ctx context.Context, cause string, delay time.Duration) result {
	now := time.Now().UTC()
	f := kv.Failure{Version: r.cred.Version, Fingerprint: r.cred.Fingerprint, At: now, Cause: cause, Attempt: r.attempt}
	if r.attempt < uint64(r.p.cfg.MaxDeliver) {
		f.RetryAt = now.Add(delay)
	}
	nctx, cancel := context.WithTimeout(ctx, failureNoteTimeout)
	defer cancel()
	if err := r.p.failures.Record(nctx, r.in.key, f); err != nil {
		r.p.log.Warn("noting a failed refresh failed; status will not show it", "key", r.in.key.String(), "error", err)
	}
	return resultOf(outTransient, delay, cause)
}

// permanentFailure is step 5 for an OAuth error that no retry can fix,
// unless another refresher won the race and spent the refresh token we
// sent: the credential is read again from the stream leader, and a changed
// refresh token or version means a lost race, never a re-auth.
func (r *refresh) permanentFailure(ctx context.Context, a answer) result {
	cur, _, err := r.p.store.Latest(ctx, r.lease.Key())
	if err != nil {
		return resultOf(outNATS, r.p.cfg.RetryBase, err.Error())
	}
	if cur.Version != r.cred.Version || cur.RefreshToken != r.cred.RefreshToken {
		return r.p.lostRace(ctx, cur)
	}
	return r.needsReauth(ctx, a.reason, a.description)
}

// storeRotation is step 6 for a new token, then step 7: store it with
// compare-and-set on the fenced revision, announce it, schedule the next
// proactive refresh.
func (r *refresh) storeRotation(ctx context.Context, tok *oauth2.Token) result {
	p := r.p
	now := time.Now().UTC()
	if !r.lease.Trusted(now) {
		// Still store: the compare-and-set on the credential's revision is
		// the fence that keeps newer tokens safe, and dropping an answer
		// whose refresh token was already redeemed would force a re-login.
		p.log.Warn("lease lost during the token-endpoint call; storing under compare-and-set only", "key", r.cred.Key.String())
	}
	got := inspect(tok, now) // what the answer may be trusted with (classify.go)
	if got.problem != "" {
		// The refresh token we sent is spent: keep the one issued, if it
		// can be kept, so that nothing is lost, and park the credential,
		// so that no retry presents the spent one or announces the token.
		if tok.RefreshToken != "" && len(tok.RefreshToken) <= maxRefreshTokenSize {
			r.cred.RefreshToken = kv.Secret(tok.RefreshToken)
		}
		return r.needsReauth(ctx, reasonUnusableToken, got.problem)
	}
	c := r.cred.Clone()
	// A refresh token left out is carried forward (RFC 6749 §6).
	c.NewGeneration(kv.Tokens{AccessToken: tok.AccessToken, TokenType: got.tokenType, RefreshToken: tok.RefreshToken, ExpiresAt: got.expiresAt}, now)
	var pending bool
	c.ScheduledFor, pending = p.nextSchedule(r.cred, c, now)

	err := r.store(ctx, c)
	if errors.Is(err, kv.ErrConflict) {
		// Someone newer wrote first (a re-registration): a late completion
		// must never overwrite newer tokens. Nothing is published.
		return resultOf(outDiscarded, 0, "")
	}
	if err != nil {
		p.log.Error("storing a rotated token failed; the new refresh token is lost and the next refresh will reuse the old one",
			"key", c.Key.String(), "fingerprint", c.Fingerprint, "error", err)
		return resultOf(outStoreFailed, p.cfg.RetryBase, err.Error())
	}
	// 7. Publish.
	if err := p.announceRotated(ctx, c); err != nil {
		p.log.Warn("announcing a rotation failed; runtimes will get it from auth.token", "key", c.Key.String(), "error", err)
	}
	if !pending {
		p.scheduleAsync(ctx, c)
	}
	return answered(outRotated, c.Version)
}

// needsReauth is step 6 and 7 for a credential only a person can repair:
// record it, and tell the runtimes.
func (r *refresh) needsReauth(ctx context.Context, reason, description string) result {
	p := r.p
	c := r.cred.Clone()
	// Both may come from the server: bounded, so that the event fits.
	c.State, c.Reason = kv.StateNeedsReauth, events.TruncateText(reason, events.MaxReasonLen)
	c.Description = events.TruncateText(scrub(description, r.cred), events.MaxErrorDescriptionLen)
	c.UpdatedAt = time.Now().UTC()
	if err := r.store(ctx, c); err != nil {
		if errors.Is(err, kv.ErrConflict) {
			if cur, _, gerr := p.store.Latest(ctx, r.lease.Key()); gerr == nil {
				return p.lostRace(ctx, cur)
			}
		}
		return resultOf(outNATS, p.cfg.RetryBase, err.Error())
	}
	// 7. Publish.
	if err := p.announceNeedsReauth(ctx, c); err != nil {
		return resultOf(outNATS, p.cfg.RetryBase, err.Error())
	}
	res := answered(outNeedsReauth, c.Version)
	res.detail = reason
	return res
}

// store is the compare-and-set write of step 6, under the lease, in a span
// of its own.
func (r *refresh) store(ctx context.Context, c *kv.Credential) error {
	ctx, span := r.p.tracer.Start(ctx, "store credential", trace.WithAttributes(
		attrKey.String(c.Key.String()), attrVersion.Int64(c.Version), attrState.String(string(c.State))))
	defer span.End()
	_, err := r.p.store.UpdateUnder(ctx, r.lease, c, r.rev)
	switch {
	case errors.Is(err, kv.ErrConflict):
		// Someone newer wrote first; the caller discards or re-reads.
		span.SetAttributes(attrConflict.Bool(true))
	case err != nil:
		span.SetStatus(codes.Error, err.Error())
	}
	return err
}

// release is the end of step 7: give the lease up. It runs in the
// background, after the event is settled: the result is stored and
// announced, and the release is fenced by the lease's revision, so waiting
// for it would only add a round trip to every refresh.
func (r *refresh) release(ctx context.Context) {
	p, lease := r.p, r.lease
	p.bg.Go(func() {
		if err := lease.Release(context.WithoutCancel(ctx)); err != nil && !errors.Is(err, kv.ErrLeaseLost) {
			p.log.Warn("lease release failed; it expires by itself", "key", lease.Key().String(), "error", err)
		}
	})
}

// decide answers an event from the stored credential alone when it can: in
// the order stale, needs_reauth, not due.
func (p *Pool) decide(ctx context.Context, ev *events.Event, c *kv.Credential) (result, bool) {
	switch p.verdict(ev, c, time.Now()) {
	case outStale:
		if err := p.announceRotated(ctx, c); err != nil {
			return resultOf(outNATS, jitter(p.cfg.LeaseWait), err.Error()), true
		}
		return answered(outStale, c.Version), true
	case outNeedsReauth:
		if err := p.announceNeedsReauth(ctx, c); err != nil {
			return resultOf(outNATS, jitter(p.cfg.LeaseWait), err.Error()), true
		}
		return answered(outNeedsReauth, c.Version), true
	case outNotDue:
		return resultOf(outNotDue, 0, ""), true
	}
	return result{}, false
}

// verdict is what the stored credential says of an event, in the order
// stale, needs_reauth, not due; outRotated when it needs a refresh.
func (p *Pool) verdict(ev *events.Event, c *kv.Credential, now time.Time) outcome {
	switch {
	case ev.Fingerprint() != c.Fingerprint && c.Valid(now):
		return outStale
	case c.State == kv.StateNeedsReauth:
		return outNeedsReauth
	case ev.Type == events.TypeExpiring && !p.due(c, now):
		return outNotDue
	}
	return outRotated
}

// due reports whether the proactive refresh of c should happen now. A token
// without an expiry is refreshed only on 401.
func (p *Pool) due(c *kv.Credential, now time.Time) bool {
	if c.ExpiresAt.IsZero() {
		return false
	}
	return !c.ExpiresAt.Add(-p.lead(c)).After(now)
}

// lostRace answers an event whose refresh another refresher completed
// first: re-announce what it stored.
func (p *Pool) lostRace(ctx context.Context, cur *kv.Credential) result {
	var err error
	if cur.State == kv.StateNeedsReauth {
		err = p.announceNeedsReauth(ctx, cur)
	} else {
		err = p.announceRotated(ctx, cur)
	}
	if err != nil {
		p.log.Warn("re-announcing after a lost race failed", "key", cur.Key.String(), "error", err)
	}
	return answered(outLostRace, cur.Version)
}
