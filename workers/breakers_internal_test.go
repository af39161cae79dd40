package workers

import (
	"context"
	"fmt"
	"net/http/httptrace"
	"testing"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/oauth2"
)

const testEndpoint = "https://as.example/token"

// calls drives a breakers value the way exchange does; reached says
// whether the fake call got a connection (as httptrace reports it).
type calls struct {
	t  *testing.T
	bs *breakers
	n  map[callKey]int // calls that were made, by key
}

func newCalls(t *testing.T, failures uint32) *calls {
	return &calls{t: t, bs: newBreakers(failures, time.Minute, nil), n: map[callKey]int{}}
}

func (c *calls) do(k callKey, reached bool, err error) error {
	_, got := c.bs.do(context.Background(), k, func(ctx context.Context) (*oauth2.Token, error) {
		c.n[k]++
		if reached {
			httptrace.ContextClientTrace(ctx).GotConn(httptrace.GotConnInfo{})
		}
		if err != nil {
			return nil, err
		}
		return &oauth2.Token{AccessToken: "at"}, nil
	})
	return got
}

func key(tenant, client string) callKey {
	return callKey{endpoint: testEndpoint, tenant: tenant, client: client}
}

var (
	answer429 = retrieveError(429, "", nil)
	answer503 = retrieveError(503, "", nil)
	refused   = fmt.Errorf("dial tcp 192.0.2.1:443: connect: connection refused")
)

// A proxy answering 429 to one tenant's client opens that client's
// breaker only: the tenant's other clients and other tenants still call.
func TestBreakerOfOneClientStopsOnlyThatClient(t *testing.T) {
	c := newCalls(t, 3)
	for range 20 {
		c.do(key("acme", "c1"), true, answer429)
		c.do(key("acme", "c1"), true, answer429)
		if err := c.do(key("bravo", "b1"), true, nil); err != nil {
			t.Fatalf("bravo's call: %v", err)
		}
	}
	if n := c.n[key("acme", "c1")]; n != 3 {
		t.Errorf("acme/c1 made %d calls, want 3 (then its breaker opened)", n)
	}
	if !c.bs.open(key("acme", "c1")) || c.bs.open(key("acme", "c2")) || c.bs.open(key("bravo", "b1")) {
		t.Error("want only acme/c1's breaker open")
	}
}

// A tenant that invents client ids, each failing at the server, opens its
// own tenant breaker; never the endpoint's, however many it invents.
func TestBreakerOfHostileTenantStaysItsOwn(t *testing.T) {
	c := newCalls(t, 3)
	for i := range 50 {
		for range 3 {
			c.do(key("mallory", fmt.Sprintf("c%d", i)), true, answer503)
		}
	}
	if !c.bs.open(key("mallory", "c-new")) {
		t.Error("the tenant's breaker did not open although two of its clients failed")
	}
	if err := c.do(key("acme", "a1"), true, nil); err != nil || c.n[key("acme", "a1")] != 1 {
		t.Fatalf("another tenant's call was refused: %v", err)
	}
	if got := c.bs.states()[breakerKey{scope: scopeEndpoint, endpoint: testEndpoint}]; got != gobreaker.StateClosed {
		t.Errorf("endpoint breaker %v, want closed", got)
	}
}

// One other tenant's passing failure does not let a failing tenant open
// the endpoint's breaker: a member counts only while its own breaker is
// open.
func TestBreakerIgnoresOneFailureOfAnotherTenant(t *testing.T) {
	c := newCalls(t, 3)
	for range 3 {
		c.do(key("mallory", "m1"), true, answer503)
	}
	c.do(key("acme", "a1"), true, answer503) // a blip: acme's breaker stays closed
	for range 10 {
		c.do(key("mallory", "m2"), true, answer503)
	}
	if c.bs.open(key("bravo", "b1")) {
		t.Error("one tenant and another's single failure opened the endpoint's breaker")
	}
}

// 5xx for every client: once two tenants' breakers are open, the
// endpoint's opens and a third tenant makes no call.
func TestBreakerOfEndpointOpensWhenTwoTenantsFail(t *testing.T) {
	c := newCalls(t, 3)
	for range 3 {
		c.do(key("acme", "a1"), true, answer503)
	}
	if c.bs.open(key("bravo", "b1")) {
		t.Fatal("one tenant's failures opened the endpoint's breaker")
	}
	for range 3 {
		c.do(key("bravo", "b1"), true, answer503)
	}
	if !c.bs.open(key("charlie", "x")) {
		t.Fatal("the endpoint's breaker did not open when two tenants' breakers were")
	}
	if err := c.do(key("charlie", "x"), true, nil); err == nil || c.n[key("charlie", "x")] != 0 {
		t.Errorf("charlie's call went through the open endpoint breaker: %v", err)
	}
}

// In a deployment of one tenant with many clients (dynamic client
// registration), 5xx for everyone opens the tenant's breaker once two
// clients have failed, which guards all of them.
func TestBreakerOfTenantOpensWhenTwoClientsFail(t *testing.T) {
	c := newCalls(t, 3)
	for _, client := range []string{"c1", "c2"} {
		for range 3 {
			c.do(key("acme", client), true, answer503)
		}
	}
	if err := c.do(key("acme", "c3"), true, nil); err == nil || c.n[key("acme", "c3")] != 0 {
		t.Errorf("a third client's call went through: %v", err)
	}
}

// An outage in a deployment with a client per credential: every call is a
// new client's first failure, so no client's breaker ever opens; the
// tenant's opens after BreakerFailures failures once two clients have
// failed, not after a call per credential.
func TestBreakerOfTenantOpensWhenEveryCallIsANewClient(t *testing.T) {
	c := newCalls(t, 3)
	calls := 0
	for i := range 1000 {
		k := key("acme", fmt.Sprintf("c%d", i))
		c.do(k, true, answer503)
		calls += c.n[k]
	}
	if calls != 4 {
		t.Errorf("%d calls of 1 000 clients went out, want 4 (the first client's failure, then 3 counted)", calls)
	}
	if c.bs.open(key("bravo", "b1")) {
		t.Error("one tenant's failures opened another tenant's way to the endpoint")
	}
}

// Failures before any request was sent (name, connect, TLS) cannot depend
// on the client: enough of them in a row open the endpoint's breaker, even
// when one client saw them all.
func TestBreakerOfEndpointOpensWhenNothingIsReached(t *testing.T) {
	c := newCalls(t, 3)
	for range 3 {
		c.do(key("acme", "a1"), false, refused)
	}
	if err := c.do(key("bravo", "b1"), true, nil); err == nil || c.n[key("bravo", "b1")] != 0 {
		t.Errorf("another tenant called an endpoint that refuses connections: %v", err)
	}
}

// A success anywhere at the endpoint clears the tally of tripped tenants.
func TestBreakerSuccessClearsTally(t *testing.T) {
	c := newCalls(t, 3)
	for range 3 {
		c.do(key("acme", "a1"), true, answer503)
	}
	c.do(key("charlie", "x"), true, nil)
	// acme's breaker is still open, but it was tallied before the success;
	// bravo alone (and acme refused without a call) is one tenant.
	for range 3 {
		c.do(key("bravo", "b1"), true, answer503)
	}
	if c.bs.open(key("delta", "d")) {
		t.Error("tenants tallied before a success still opened the endpoint's breaker")
	}
}

// The breakers kept are bounded: a flood of distinct endpoints evicts the
// least recently used, and closed breakers idle long enough go first.
func TestBreakersAreBounded(t *testing.T) {
	bs := newBreakers(3, time.Minute, nil)
	bs.max = 30
	for i := range 1000 {
		k := callKey{endpoint: fmt.Sprintf("https://h%d.example/token", i), tenant: "mallory", client: "c"}
		_, _ = bs.do(context.Background(), k, func(context.Context) (*oauth2.Token, error) { return &oauth2.Token{}, nil })
		if n := bs.size(); n > bs.max {
			t.Fatalf("%d breakers kept after %d endpoints, bound %d", n, i+1, bs.max)
		}
	}

	bs = newBreakers(3, time.Minute, nil)
	t0 := time.Now()
	for i := range 10 {
		bs.get(breakerKey{scope: scopeClient, endpoint: testEndpoint, tenant: "t", client: fmt.Sprint(i)}, t0)
	}
	bs.get(breakerKey{scope: scopeEndpoint, endpoint: "https://later.example/token"}, t0.Add(bs.idleAfter+time.Second))
	if n := bs.size(); n != 1 {
		t.Errorf("%d breakers kept after the others were idle for %v, want 1", n, bs.idleAfter)
	}
}

// Endpoint labels of metrics are scheme and host, and bounded: the hosts
// beyond the bound share one label.
func TestEndpointLabelsAreBounded(t *testing.T) {
	l := &endpointLabels{max: 5}
	labels := map[string]bool{}
	for i := range 100 {
		labels[l.label(fmt.Sprintf("https://user:pw@h%d.example:8443/t/%d?secret=x", i, i))] = true
	}
	if len(labels) != 6 || !labels[otherEndpoints] || !labels["https://h0.example:8443"] {
		t.Errorf("labels %v: want the first 5 hosts and %q", labels, otherEndpoints)
	}
	if got := l.label("https://h1.example:8443/another/path"); got != "https://h1.example:8443" {
		t.Errorf("a known host under another path is labelled %q", got)
	}
}
