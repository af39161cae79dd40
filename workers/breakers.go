package workers

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/oauth2"
)

// breakers holds one circuit breaker per token endpoint, per process.
// gobreaker's DistributedCircuitBreaker does not fit NATS KV (its keys
// contain ':' and it holds the shared lock across the call), and a per-process
// breaker already bounds the calls to a failing server to a few per process.
// Safe for concurrent use.
type breakers struct {
	failures uint32
	openFor  time.Duration
	onChange func(endpoint string, from, to gobreaker.State)

	mu sync.Mutex
	m  map[string]*gobreaker.CircuitBreaker[*oauth2.Token]
}

func newBreakers(failures uint32, openFor time.Duration, onChange func(string, gobreaker.State, gobreaker.State)) *breakers {
	return &breakers{failures: failures, openFor: openFor, onChange: onChange, m: map[string]*gobreaker.CircuitBreaker[*oauth2.Token]{}}
}

// get returns the breaker of endpoint, creating it on first use.
func (b *breakers) get(endpoint string) *gobreaker.CircuitBreaker[*oauth2.Token] {
	b.mu.Lock()
	defer b.mu.Unlock()
	cb, ok := b.m[endpoint]
	if !ok {
		cb = gobreaker.NewCircuitBreaker[*oauth2.Token](gobreaker.Settings{
			Name:         endpoint,
			MaxRequests:  1,
			Timeout:      b.openFor,
			ReadyToTrip:  func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= b.failures },
			IsSuccessful: countsAsSuccess,
			// Our own cancellations (shutdown) say nothing about the server.
			IsExcluded: func(err error) bool { return errors.Is(err, context.Canceled) },
			OnStateChange: func(name string, from, to gobreaker.State) {
				if b.onChange != nil {
					b.onChange(name, from, to)
				}
			},
		})
		b.m[endpoint] = cb
	}
	return cb
}

// open reports whether endpoint's breaker refuses calls right now, so a
// worker can skip claiming a lease it could not use.
func (b *breakers) open(endpoint string) bool {
	return b.get(endpoint).State() == gobreaker.StateOpen
}
