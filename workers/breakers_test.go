package workers_test

import (
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// tenantCred is one tenant's credential at the test server, with a client
// of its own.
type tenantCred struct {
	key    events.Key
	client string
	tok    authtest.Tokens
}

func registerTenant(t *testing.T, b *fleet.Fleet, key, client, endpoint string) tenantCred {
	t.Helper()
	b.AS.AddClient(client, "secret-of-"+client)
	c := tenantCred{key: fleet.MustKey(t, key), client: client, tok: b.AS.Issue(client)}
	b.Register(t, c.key, c.tok, func(r *events.RegisterRequest) {
		r.ClientID, r.ClientSecret = client, "secret-of-"+client
		if endpoint != "" {
			r.TokenEndpoint = endpoint
		}
	})
	return c
}

func (c tenantCred) publish401(t *testing.T, b *fleet.Fleet) {
	t.Helper()
	b.Publish401(t, c.key, events.Fingerprint(c.tok.AccessToken), "rt-"+c.key.Tenant, true)
}

func callsOf(as *authtest.Server, client string) int {
	n := 0
	for _, c := range as.CallLog() {
		if c.ClientID == client {
			n++
		}
	}
	return n
}

func breakerOpened(b *fleet.Fleet, scope string) bool {
	return len(b.Logs.Records(map[string]string{"msg": "token endpoint breaker changed state", "scope": scope, "to": "open"})) > 0
}

// settledAs reports whether an event of key was settled with outcome on
// its first delivery.
func settledAs(b *fleet.Fleet, key events.Key, outcome string) bool {
	return len(b.Logs.Records(map[string]string{"msg": "event processed", "subject": b.Subj.Work(events.Type401, key),
		"outcome": outcome, "attempt": "1"})) > 0
}

// A proxy that answers 429 to one tenant's client only opens that
// client's breaker: another tenant's 401 at the same endpoint still
// rotates at once, with its one call.
func TestBreakerOfOneTenantsClientSparesOthers(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, func(c *workers.Config) { c.BreakerOpenFor = time.Minute })
	acme := registerTenant(t, b, "acme.alice.github", "client-acme", "")
	bravo := registerTenant(t, b, "bravo.bob.github", "client-bravo", "")
	b.AS.FailClient(acme.client, http.StatusTooManyRequests, `{"error":"rate_limited"}`, nil)

	acme.publish401(t, b)
	fleet.Eventually(t, 20*time.Second, "acme's client breaker opens", func() bool { return breakerOpened(b, "client") })

	w := b.Watch(t, bravo.key)
	bravo.publish401(t, b)
	w.WaitFor(t, "bravo's rotation", fleet.RotatedVersion(2))
	if n := callsOf(b.AS, bravo.client); n != 1 {
		t.Errorf("bravo's client made %d calls, want 1", n)
	}
	if breakerOpened(b, "endpoint") || breakerOpened(b, "tenant") {
		t.Error("one client's 429s opened a breaker beyond its own")
	}
	if n := len(b.Logs.Records(map[string]string{"outcome": "breaker_open", "subject": b.Subj.Work(events.Type401, bravo.key)})); n != 0 {
		t.Errorf("bravo's event was refused by a breaker %d times", n)
	}
}

// An endpoint down for everyone still trips one breaker that guards every
// tenant: 5xx for every client once two tenants have seen it, a refused
// connection at once (no request was sent, so no client can be to blame).
func TestBreakerOfEndpointDownForEveryone(t *testing.T) {
	t.Run("5xx for every client", func(t *testing.T) {
		b := fleet.Setup(t)
		b.StartPools(t, 1, func(c *workers.Config) { c.BreakerOpenFor = time.Minute })
		var creds []tenantCred
		for _, tenant := range []string{"acme", "bravo", "charlie"} {
			c := registerTenant(t, b, tenant+".u.github", "client-"+tenant, "")
			b.AS.FailClient(c.client, http.StatusServiceUnavailable, "", nil)
			creds = append(creds, c)
		}
		creds[0].publish401(t, b)
		creds[1].publish401(t, b)
		fleet.Eventually(t, 20*time.Second, "the endpoint's breaker opens", func() bool { return breakerOpened(b, "endpoint") })

		charlie := creds[2]
		charlie.publish401(t, b)
		fleet.Eventually(t, 20*time.Second, "charlie's 401 meets the open breaker", func() bool {
			return settledAs(b, charlie.key, "breaker_open")
		})
		if n := callsOf(b.AS, charlie.client); n != 0 {
			t.Errorf("charlie's client made %d calls to an endpoint failing for everyone", n)
		}
	})

	t.Run("connection refused", func(t *testing.T) {
		b := fleet.Setup(t)
		b.StartPools(t, 1, func(c *workers.Config) { c.BreakerOpenFor = time.Minute })
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := "http://" + l.Addr().String() + "/token"
		l.Close()
		acme := registerTenant(t, b, "acme.u.github", "client-acme", dead)
		bravo := registerTenant(t, b, "bravo.u.github", "client-bravo", dead)
		acme.publish401(t, b)
		fleet.Eventually(t, 20*time.Second, "the endpoint's breaker opens", func() bool { return breakerOpened(b, "endpoint") })
		bravo.publish401(t, b)
		fleet.Eventually(t, 20*time.Second, "bravo's 401 meets the open breaker", func() bool {
			return settledAs(b, bravo.key, "breaker_open")
		})
		if n := len(b.Logs.Records(map[string]string{"msg": "event processed", "subject": b.Subj.Work(events.Type401, bravo.key), "outcome": "transient"})); n != 0 {
			t.Errorf("bravo tried the dead endpoint %d times", n)
		}
	})
}
