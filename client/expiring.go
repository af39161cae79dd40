package client

import (
	"context"
	"time"

	"github.com/authbus/authbus/events"
)

// scheduleExpiringLocked arranges the auth.expiring report of the token just
// installed, replacing the report of the previous one.
func (s *Source) scheduleExpiringLocked() {
	if s.expiring != nil {
		s.expiring.Stop()
	}
	if !s.cfg.expiring || s.tok.ExpiresAt.IsZero() {
		return
	}
	fp, exp := s.tok.Fingerprint, s.tok.ExpiresAt
	// A token received already expired has no lifetime left: report it now.
	at := exp.Add(-events.Lead(max(exp.Sub(s.receivedAt), 0)))
	s.expiring = time.AfterFunc(time.Until(at), func() { s.reportExpiring(fp, exp) })
}

// reportExpiring publishes auth.expiring for the token of fingerprint fp if
// it is still the one held.
func (s *Source) reportExpiring(fp string, exp time.Time) {
	s.mu.Lock()
	current := !s.closed && s.tok != nil && s.tok.Fingerprint == fp
	if current {
		s.wg.Add(1) // under mu and before closed is set: Close waits for it
	}
	s.mu.Unlock()
	if !current {
		return
	}
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.requestTimeout)
	defer cancel()
	if _, err := s.publish(ctx, events.Expiring{Fingerprint: fp, ExpiresAt: exp}, fp); err != nil {
		s.log.Warn("reporting an expiring token failed; the refreshers' own schedule still refreshes it",
			"fingerprint", fp, "error", err)
	}
}
