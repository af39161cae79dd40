package events

import "time"

// Lead is how long before expiry a token is due for its proactive refresh,
// the rule of the protocol's auth.expiring: 10 % of the token's lifetime,
// clamped to 30s–10m, and never more than half of it. Refreshers schedule
// by it and runtimes may report auth.expiring by it; an auth.expiring that
// arrives earlier is acked as not due.
func Lead(lifetime time.Duration) time.Duration {
	l := min(max(lifetime/10, 30*time.Second), 10*time.Minute)
	return min(l, lifetime/2)
}
