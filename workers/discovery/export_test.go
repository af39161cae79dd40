package discovery

import "time"

// SetClock makes r read the time from now, so that a test steps past the
// TTL instead of waiting for it.
func (d *Resolver) SetClock(now func() time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.now = now
}
