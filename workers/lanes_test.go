package workers_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/discovery"
)

// slowIssuer is an issuer whose metadata requests wait until release is
// closed; it counts the requests that arrived.
type slowIssuer struct {
	*authtest.MetadataServer
	released chan struct{}
	once     sync.Once
	arrived  chan string
}

func (s *slowIssuer) release() { s.once.Do(func() { close(s.released) }) }

func newSlowIssuer(t *testing.T, tokenURL string) *slowIssuer {
	s := &slowIssuer{released: make(chan struct{}), arrived: make(chan string, 100)}
	s.MetadataServer = authtest.NewMetadataServer(t, func(m *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		s.arrived <- r.URL.Path
		select {
		case <-s.released:
		case <-r.Context().Done():
			return
		}
		issuer := m.URL + strings.TrimPrefix(r.URL.Path, "/.well-known/oauth-authorization-server")
		authtest.WriteJSON(w, map[string]any{"issuer": issuer, "token_endpoint": tokenURL})
	})
	return s
}

// registerAsync sends a registration and reports its outcome on done:
// "" on success, else the error code and description.
func registerAsync(b *fleet.Fleet, key events.Key, tune func(*events.RegisterRequest), done chan<- string) {
	tok := b.AS.Issue(fleet.ClientID)
	go func() {
		_, err := b.TryRegister(key, tok, tune)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		done <- key.String() + " " + msg
	}()
}

// Registrations that wait for one tenant's slow issuers are served side
// by side, and another tenant's registration completes while they still
// wait: the order of completions, not a time, shows it.
func TestSlowIssuersOfOneTenantDoNotDelayAnother(t *testing.T) {
	b := fleet.Setup(t)
	slow := newSlowIssuer(t, b.AS.TokenURL())
	defer slow.release() // before the pool stops: it waits for the registrations
	b.StartPools(t, 1, func(c *workers.Config) {
		c.Discovery = discovery.NewResolver(discovery.Config{HTTPClient: slow.Client(), Timeout: time.Minute})
	})
	done := make(chan string, 10)
	for i := range 3 {
		registerAsync(b, fleet.MustKey(t, fmt.Sprintf("mallory.u%d.github", i)), issuerOf(fmt.Sprintf("%s/m%d", slow.URL, i)), done)
	}
	for range 3 {
		select {
		case <-slow.arrived: // each registration is being served at once
		case <-time.After(20 * time.Second):
			t.Fatal("the three registrations are not served side by side: fewer than three metadata requests arrived")
		}
	}

	registerAsync(b, fleet.MustKey(t, "acme.alice.github"), nil, done)
	first := <-done
	slow.release()
	var rest []string
	for range 3 {
		rest = append(rest, <-done)
	}
	if first != "acme.alice.github " {
		t.Fatalf("first completion %q, want acme's registration, successful, while mallory's waited", first)
	}
	for _, r := range rest {
		if !strings.HasPrefix(r, "mallory.") || !strings.HasSuffix(r, " ") {
			t.Errorf("after the release: %q, want mallory's registrations, successful", r)
		}
	}
}

// A tenant gets a share of the requests served at once and a few waiting
// places; beyond them its request is answered 503 unavailable, asking to
// retry, while another tenant is still served.
func TestRequestsBeyondATenantsShareAreRefused(t *testing.T) {
	b := fleet.Setup(t)
	slow := newSlowIssuer(t, b.AS.TokenURL())
	defer slow.release() // before the pool stops: it waits for the registrations
	b.StartPools(t, 1, func(c *workers.Config) {
		c.Requests = 4 // a tenant: 1 served, 2 waiting
		c.Discovery = discovery.NewResolver(discovery.Config{HTTPClient: slow.Client(), Timeout: time.Minute})
	})
	done := make(chan string, 10)
	for i := range 4 {
		registerAsync(b, fleet.MustKey(t, fmt.Sprintf("mallory.u%d.github", i)), issuerOf(fmt.Sprintf("%s/m%d", slow.URL, i)), done)
	}
	<-slow.arrived // one is served, waiting for its issuer
	refused := <-done
	code, body, _ := strings.Cut(strings.TrimPrefix(refused[strings.Index(refused, " ")+1:], ""), ": ")
	var er events.ErrorReply
	if err := json.Unmarshal([]byte(body), &er); code != "503" || err != nil || er.Error != events.CodeUnavailable ||
		!strings.Contains(er.ErrorDescription, "retry") || !strings.Contains(er.ErrorDescription, `"mallory"`) {
		t.Fatalf("the fourth registration: %q, want 503 unavailable naming the tenant and asking to retry", refused)
	}

	registerAsync(b, fleet.MustKey(t, "acme.alice.github"), nil, done)
	if got := <-done; got != "acme.alice.github " {
		t.Fatalf("another tenant's registration: %q, want success while mallory's wait", got)
	}
	slow.release()
	for range 3 {
		if got := <-done; !strings.HasSuffix(got, " ") {
			t.Errorf("a waiting registration: %q, want success once its turn came", got)
		}
	}
}
