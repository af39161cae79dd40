package workers

import (
	"cmp"
	"context"
	"errors"
	"net/http/httptrace"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/oauth2"
)

// breakers guard the token endpoints, per process, so that one tenant's
// failing client does not stop another tenant's refreshes while an
// endpoint that is down for everyone still stops every call to it. Each
// token call passes three gobreaker breakers, outermost first:
//
//   - the endpoint's (scope "endpoint"), which guards every call to it;
//   - the tenant's at that endpoint ("tenant"), which guards the tenant's;
//   - the client's, per tenant and client_id at that endpoint ("client").
//
// The rule, which docs/operations.md repeats: a client's breaker counts
// every transient failure of its calls and opens after BreakerFailures in
// a row. A tenant's breaker opens when the breakers of two different
// clients of the tenant are open (or probing) with no success of the
// tenant at the endpoint since, or after BreakerFailures failures in a row
// once two different clients of the tenant have failed since its last
// success; the endpoint's breaker when those of two different tenants are. Either also opens after BreakerFailures
// failures in a row that never reached the server (name resolution,
// connect, TLS: no request had been sent, so they cannot depend on the
// client). A success counts as one at all three, and clears their tallies
// of members found failing. So a tenant alone, whatever it registers,
// can open only its own breakers: its client_ids are its own to invent,
// its tenant name is not (NATS permissions fix it); two tenants acting
// together can open the endpoint's, for BreakerOpenFor at a time, unless a
// success comes in between. A proxy answering 429 to one client stops that
// client; 5xx for everyone opens the endpoint's breaker once two tenants'
// breakers have opened (in a deployment of one tenant, the tenant's
// breaker, which then guards everything, once two of its clients' have).
//
// gobreaker's DistributedCircuitBreaker does not fit NATS KV (its keys
// contain ':' and it holds the shared lock across the call), and
// per-process breakers already bound the calls to a failing server to a
// few per process.
//
// The breakers are bounded: at most maxBreakers are kept, and a closed one
// unused for idleAfter is dropped (a registration of thousands of distinct
// endpoints must not grow memory without end). Safe for concurrent use.
type breakers struct {
	failures  uint32
	openFor   time.Duration
	idleAfter time.Duration
	max       int
	onChange  func(k breakerKey, from, to gobreaker.State)

	mu        sync.Mutex
	m         map[breakerKey]*breaker
	lastSweep time.Time
}

// Breaker bounds: enough for every client of a large deployment; a closed
// breaker idle for idleBreakerMin (or ten open periods) holds nothing
// worth keeping.
const (
	maxBreakers    = 10_000
	idleBreakerMin = 10 * time.Minute
)

// scope is which calls a breaker guards.
type scope int

const (
	scopeEndpoint scope = iota
	scopeTenant
	scopeClient
)

func (s scope) String() string { return [...]string{"endpoint", "tenant", "client"}[s] }

// breakerKey names a breaker: the fields its scope uses, the others empty.
type breakerKey struct {
	scope                    scope
	endpoint, tenant, client string
}

// callKey names the breakers one token call passes.
type callKey struct{ endpoint, tenant, client string }

// chain is the keys of k's breakers, outermost first.
func (k callKey) chain() [3]breakerKey {
	return [3]breakerKey{
		{scope: scopeEndpoint, endpoint: k.endpoint},
		{scope: scopeTenant, endpoint: k.endpoint, tenant: k.tenant},
		{scope: scopeClient, endpoint: k.endpoint, tenant: k.tenant, client: k.client},
	}
}

// breaker is one gobreaker breaker and, for the endpoint and tenant
// scopes, the tally of its members (tenants, clients) whose own breakers
// are open, kept since the last success; two are all the rule needs.
type breaker struct {
	key      breakerKey
	cb       *gobreaker.TwoStepCircuitBreaker[struct{}]
	lastUsed atomic.Int64 // unix nanoseconds

	mu      sync.Mutex
	tripped []trip     // at most 2, of distinct members
	failing []*breaker // a tenant's: its last 2 distinct clients that failed since its last success
}

// trip is a member found failing: member is its breaker (the tenant's
// under an endpoint, the client's under a tenant), witness the breaker
// below br that was open then (the member's own, or its client's), which
// tells whether it still is.
type trip struct{ member, witness *breaker }

// The outcomes a call reports to each breaker: gobreaker counts nil as a
// success, errExcluded as nothing, errCounted as a failure.
var (
	errCounted  = errors.New("token call failed")
	errExcluded = errors.New("token call says nothing about this breaker")
)

func newBreakers(failures uint32, openFor time.Duration, onChange func(breakerKey, gobreaker.State, gobreaker.State)) *breakers {
	return &breakers{
		failures:  failures,
		openFor:   openFor,
		idleAfter: max(idleBreakerMin, 10*openFor),
		max:       maxBreakers,
		onChange:  onChange,
		m:         map[breakerKey]*breaker{},
	}
}

// get returns the breaker of k, creating it on first use.
func (b *breakers) get(k breakerKey, now time.Time) *breaker {
	b.mu.Lock()
	defer b.mu.Unlock()
	br, ok := b.m[k]
	if !ok {
		b.evictLocked(now)
		br = &breaker{key: k}
		br.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
			Name:        k.scope.String(),
			MaxRequests: 1,
			Timeout:     b.openFor,
			ReadyToTrip: func(c gobreaker.Counts) bool {
				if c.ConsecutiveFailures >= b.failures {
					return true
				}
				br.mu.Lock()
				defer br.mu.Unlock()
				return len(br.tripped) >= 2
			},
			IsSuccessful: func(err error) bool { return err == nil },
			IsExcluded:   func(err error) bool { return errors.Is(err, errExcluded) },
			OnStateChange: func(_ string, from, to gobreaker.State) {
				if b.onChange != nil {
					b.onChange(k, from, to)
				}
			},
		})
		b.m[k] = br
	}
	br.lastUsed.Store(now.UnixNano())
	return br
}

// evictLocked makes room before a new breaker is added: at most once per
// idle period it drops the closed breakers idle that long, and at the
// bound it drops the least recently used tenth, closed ones first.
func (b *breakers) evictLocked(now time.Time) {
	if len(b.m) < b.max && now.Sub(b.lastSweep) < b.idleAfter {
		return
	}
	b.lastSweep = now
	idle := now.Add(-b.idleAfter).UnixNano()
	type entry struct {
		k    breakerKey
		open bool
		at   int64
	}
	var keep []entry
	for k, br := range b.m {
		open, at := br.cb.State() != gobreaker.StateClosed, br.lastUsed.Load()
		if !open && at < idle {
			delete(b.m, k)
			continue
		}
		keep = append(keep, entry{k, open, at})
	}
	if len(b.m) < b.max {
		return
	}
	// Over the bound with everything in use: only a flood of distinct
	// endpoints or clients gets here, and it pays a sort per tenth.
	slices.SortFunc(keep, func(x, y entry) int {
		if x.open != y.open {
			if x.open {
				return 1
			}
			return -1
		}
		return cmp.Compare(x.at, y.at)
	})
	for _, e := range keep[:max(1, b.max/10)] {
		delete(b.m, e.k)
	}
}

// open reports whether a breaker of k refuses calls right now, so that a
// worker can skip claiming a lease it could not use. It creates nothing.
func (b *breakers) open(k callKey) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, bk := range k.chain() {
		if br, ok := b.m[bk]; ok && br.cb.State() == gobreaker.StateOpen {
			return true
		}
	}
	return false
}

// do makes the token call through k's breakers. A refusing breaker makes
// no call and returns gobreaker.ErrOpenState or ErrTooManyRequests, which
// classify reads as breakerOpen.
func (b *breakers) do(ctx context.Context, k callKey, call func(context.Context) (*oauth2.Token, error)) (*oauth2.Token, error) {
	now := time.Now()
	keys := k.chain()
	var chain [3]*breaker
	var dones [3]func(error)
	for i, bk := range keys {
		chain[i] = b.get(bk, now)
		done, err := chain[i].cb.Allow()
		if err != nil {
			for _, d := range dones[:i] {
				d(errExcluded)
			}
			return nil, err
		}
		dones[i] = done
	}
	// Whether a connection was had: a failure before that (name, connect,
	// TLS) happened before any request, so it cannot be client-specific.
	var reached atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) { reached.Store(true) },
	})
	tok, err := call(ctx)
	v := classify(err).verdict
	// Innermost first: a parent's judgement needs to know whether the
	// breaker below it is open after this call.
	for i := len(chain) - 1; i >= 0; i-- {
		dones[i](chain[i].judge(v, reached.Load(), chain[i+1:]))
	}
	return tok, err
}

// judge is what a call that came to v means for br; below are the
// breakers under br that the call passed, its member's first (none for a
// client's breaker).
func (br *breaker) judge(v verdict, reached bool, below []*breaker) error {
	switch v {
	case rotated, permanent:
		// The server answered correctly, whatever it answered.
		br.mu.Lock()
		br.tripped, br.failing = br.tripped[:0], br.failing[:0]
		br.mu.Unlock()
		return nil
	case transient:
	default:
		return errExcluded // our own cancellation, or no call at all
	}
	if len(below) == 0 || !reached {
		return errCounted
	}
	// States are read without br.mu held: locks go from a breaker's tally
	// to the gobreakers below it, never back.
	now := trip{member: below[0]}
	for _, w := range below {
		if w.cb.State() != gobreaker.StateClosed {
			now.witness = w
			break
		}
	}
	br.mu.Lock()
	earlier := slices.Clone(br.tripped)
	br.mu.Unlock()
	still := make([]trip, 0, 3)
	for _, t := range earlier {
		if t.member != now.member && t.witness.cb.State() != gobreaker.StateClosed {
			still = append(still, t)
		}
	}
	if now.witness != nil {
		still = append(still, now)
	}
	still = still[max(0, len(still)-2):]
	br.mu.Lock()
	br.tripped = still
	// A tenant's failures also count once two of its clients have failed
	// since its last success, open breakers or not: with a client per
	// credential (dynamic client registration) no client fails twice in an
	// outage, and waiting for two clients' breakers to open cost a call per
	// credential (7 914 calls in a 2-minute outage of a 10 000-credential
	// soak). One client failing alone still stops only itself; the
	// endpoint's rule stays the stricter one, since tenants are not each
	// other's to blame.
	if br.key.scope == scopeTenant && !slices.Contains(br.failing, below[0]) {
		br.failing = append(br.failing[max(0, len(br.failing)-1):], below[0])
	}
	clients := len(br.failing)
	br.mu.Unlock()
	if len(still) >= 2 || clients >= 2 {
		return errCounted
	}
	return errExcluded
}

// states returns the state of every breaker kept.
func (b *breakers) states() map[breakerKey]gobreaker.State {
	b.mu.Lock()
	all := make([]*breaker, 0, len(b.m))
	for _, br := range b.m {
		all = append(all, br)
	}
	b.mu.Unlock()
	out := make(map[breakerKey]gobreaker.State, len(all))
	for _, br := range all {
		out[br.key] = br.cb.State()
	}
	return out
}

// size returns how many breakers are kept.
func (b *breakers) size() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.m)
}
