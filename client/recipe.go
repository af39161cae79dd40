package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/authbus/authbus/events"
)

// Refusal is a request that the resource server refused with a token: what
// an auth.401 event reports.
type Refusal struct {
	// Fingerprint is the fingerprint of the refused access token
	// (events.Fingerprint); required. The token itself is never sent.
	Fingerprint string
	// Status is the HTTP status seen; 0 means 401.
	Status int
	// URL of the refused request, optional. Leave out user info and query
	// parameters that may hold secrets; at most events.MaxURLLen bytes.
	URL string
}

// Current returns the token in force as the protocol describes it
// (access token, type, expiry, fingerprint, version), by the same rules as
// TokenContext: from the local copy while it is valid, otherwise from the
// token service.
func (s *Source) Current(ctx context.Context) (events.Rotated, error) { return s.current(ctx) }

// Report401 publishes auth.401 for the refused token (step 2 of the
// protocol's recipe for a 401) and returns the stream's acknowledgement. It
// does not wait for a new token: Renew does both, and Replacement waits.
// The report carries the fingerprint, this runtime's name (WithRuntime), the
// status, the URL and the time; a report the stream already holds for the
// same token comes back as Published.Duplicate. An invalid Refusal is
// refused with an error wrapping events.ErrInvalidEvent before anything is
// sent. It is safe for concurrent use.
func (s *Source) Report401(ctx context.Context, r Refusal) (Published, error) {
	if r.Status == 0 {
		r.Status = http.StatusUnauthorized
	}
	p := events.Unauthorized{Fingerprint: r.Fingerprint, Runtime: s.cfg.runtime, Status: r.Status, URL: r.URL, ObservedAt: time.Now().UTC()}
	if err := p.Validate(); err != nil {
		return Published{}, fmt.Errorf("client: reporting a 401 for %s: %w", s.key, err)
	}
	return s.publishOwned(ctx, p, r.Fingerprint)
}

// ReportExpiring publishes auth.expiring for the token of fingerprint fp,
// which expires at expiresAt, and returns the stream's acknowledgement. The
// refreshers refresh only a credential that is due (see WithExpiring), so a
// report that is not due changes nothing. It is safe for concurrent use.
func (s *Source) ReportExpiring(ctx context.Context, fp string, expiresAt time.Time) (Published, error) {
	p := events.Expiring{Fingerprint: fp, ExpiresAt: expiresAt.UTC()}
	if err := p.Validate(); err != nil {
		return Published{}, fmt.Errorf("client: reporting an expiring token for %s: %w", s.key, err)
	}
	return s.publishOwned(ctx, p, fp)
}

// publishOwned is publish as work the Source owns: Close waits for it.
func (s *Source) publishOwned(ctx context.Context, p events.Payload, fp string) (Published, error) {
	if !s.enter() {
		return Published{}, fmt.Errorf("client: publishing %s for %s: %w", p.EventType(), s.key, ErrClosed)
	}
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.requestTimeout)
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()
	res, err := s.publish(ctx, p, fp)
	if err != nil && s.ctx.Err() != nil && errors.Is(err, context.Canceled) {
		err = fmt.Errorf("client: publishing %s for %s: %w", p.EventType(), s.key, ErrClosed)
	}
	return res, err
}

// Renew follows the protocol's recipe for a 401 and returns the token that
// replaces the refused one: unless a token with another fingerprint is
// already held, it reports the refusal (Report401), asks auth.token at once
// and, if that still answers the refused token, waits for the auth.rotated
// event (see Replacement). A Transport does the same for every request
// that gets 401; call Renew when something else holds the HTTP exchange.
// Goroutines that renew the same refused token at once share one report.
// Errors are those of Report401 and Replacement. It is safe for concurrent
// use.
func (s *Source) Renew(ctx context.Context, r Refusal) (events.Rotated, error) {
	return s.renew(ctx, r, 0)
}

// renew is Renew for a refused token of version v (0 when not known): a
// needs_reauth of an older generation than v does not answer it.
func (s *Source) renew(ctx context.Context, r Refusal, v int64) (events.Rotated, error) {
	st := s.snapshot()
	switch {
	case st.closed:
		return events.Rotated{}, fmt.Errorf("client: renewing the token of %s: %w", s.key, ErrClosed)
	case st.reauth != nil && st.reauth.Version >= v:
		return events.Rotated{}, st.reauthErr()
	case st.tok != nil && st.tok.Fingerprint != r.Fingerprint:
		return *st.tok, nil
	}
	if err := s.reportShared(ctx, r); err != nil {
		// The caller's deadline, if it passed, says more than the publish.
		return events.Rotated{}, s.waitError(ctx, err)
	}
	return s.replacement(ctx, r.Fingerprint, v)
}

// reportShared is Report401 shared by the goroutines that saw the same
// token refused at the same time: one publish for all of them.
func (s *Source) reportShared(ctx context.Context, r Refusal) error {
	return s.shared(ctx, "reporting the 401 of token "+r.Fingerprint, func(ctx context.Context) error {
		_, err := s.Report401(ctx, r)
		return err
	})
}

// Replacement waits for a token whose fingerprint is not fp, after fp was
// reported (Report401, or ReportExpiring when the credential is due), and
// returns it. It asks auth.token at once: a report that reached the stream
// after the rotation is dropped as a duplicate of the first one, so no
// refresher announces the new token again for it, and only this answer
// tells. If that answer is still fp, it waits for the auth.rotated or
// auth.needs_reauth event of the key, asking auth.token again after
// WithRecheckInterval and then at growing gaps, at most as long as
// WithWaitTimeout and ctx allow.
//
// Errors: a *NeedsReauthError when the credential needs a new login; errors
// wrapping ErrTimeout when the wait bound passed, ErrNotFound when the
// credential is not (or no longer) registered, ErrClosed, or ctx's error.
// It is safe for concurrent use.
func (s *Source) Replacement(ctx context.Context, fp string) (events.Rotated, error) {
	return s.replacement(ctx, fp, 0)
}

// replacement is Replacement for a refused token of version v (0 when not
// known): a needs_reauth of an older generation than v does not answer it.
func (s *Source) replacement(ctx context.Context, fp string, v int64) (events.Rotated, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, s.cfg.wait, errWaitBound)
	defer cancel()
	// Ask at once, before looking at what is held: the held state may
	// predate the report.
	if err := s.fetch(ctx); err != nil && (errors.Is(err, ErrNotFound) || errors.Is(err, ErrClosed) || errors.Is(err, ErrRefused)) {
		return events.Rotated{}, err
	}
	every := s.cfg.recheck
	recheck := time.NewTimer(every)
	defer recheck.Stop()
	for {
		st := s.snapshot()
		switch {
		case st.closed:
			return events.Rotated{}, fmt.Errorf("client: waiting for a new token for %s: %w", s.key, ErrClosed)
		case st.reauth != nil && st.reauth.Version >= v:
			return events.Rotated{}, st.reauthErr()
		case st.tok != nil && st.tok.Fingerprint != fp:
			return *st.tok, nil
		}
		select {
		case <-st.changed:
		case <-recheck.C:
			// Errors are the refreshers' business here: keep waiting.
			_ = s.fetch(ctx)
			every = min(2*every, maxRecheckFactor*s.cfg.recheck)
			recheck.Reset(every)
		case <-ctx.Done():
			return events.Rotated{}, s.waitError(ctx, ctx.Err())
		case <-s.ctx.Done():
		}
	}
}
