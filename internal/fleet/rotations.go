package fleet

import (
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
)

// Rotations records when each credential's auth.rotated of one version
// first arrived, across every key, and closes Done once n keys have it.
// Storms and benchmarks use it to time 401 → rotated for many keys at once.
type Rotations struct {
	// Done is closed when n keys have been rotated to the version.
	Done <-chan struct{}

	mu   sync.Mutex
	at   map[string]time.Time
	done chan struct{}
}

// WatchRotations subscribes to every auth.rotated and records the first
// arrival of version for each key; it unsubscribes when the test ends.
func (b *Fleet) WatchRotations(t testing.TB, version int64, n int) *Rotations {
	t.Helper()
	r := &Rotations{at: make(map[string]time.Time, n), done: make(chan struct{})}
	r.Done = r.done
	sub, err := b.NC.Subscribe(b.Subj.Prefix()+".rotated.>", func(m *nats.Msg) {
		now := time.Now()
		_, key, err := b.Subj.ParseEvent(m.Subject)
		if err != nil {
			return
		}
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err != nil || ev.Rotated.Version != version {
			return
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if _, seen := r.at[key.String()]; !seen {
			r.at[key.String()] = now
			if len(r.at) == n {
				close(r.done)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := b.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

// At returns when each key seen so far was rotated.
func (r *Rotations) At() map[string]time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]time.Time, len(r.at))
	for k, v := range r.at {
		out[k] = v
	}
	return out
}

// Count returns how many keys have been rotated so far.
func (r *Rotations) Count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.at)
}
