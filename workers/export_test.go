package workers

import (
	"context"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// Release releases creds as if the breaker of their token endpoint had
// just closed after they were parked behind it.
func (p *Pool) Release(ctx context.Context, creds []*kv.Credential) {
	set := map[events.Key]parkedCred{}
	for _, c := range creds {
		set[c.Key] = parkedCred{fingerprint: c.Fingerprint, expiresAt: c.ExpiresAt, receivedAt: c.ReceivedAt}
	}
	p.release(ctx, "test", set)
}
