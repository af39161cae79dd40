package discovery_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/workers/discovery"
	"github.com/authbus/authbus/workers/egress"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Concurrent lookups of one issuer make one fetch.
func TestDiscoveryConcurrentLookupsFetchOnce(t *testing.T) {
	release := make(chan struct{})
	arrived := make(chan struct{}, 100)
	srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		authtest.WriteJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": "https://as.example/token"})
	})
	d := discovery.NewResolver(discovery.Config{HTTPClient: srv.Client()})
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			md, err := d.Lookup(context.Background(), srv.URL)
			if err == nil && md.TokenEndpoint != "https://as.example/token" {
				err = fmt.Errorf("token endpoint %q", md.TokenEndpoint)
			}
			errs <- err
		})
	}
	<-arrived // one fetch is in flight; the others join it or find the cache
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := srv.Requests(); got != 1 {
		t.Errorf("metadata requests = %d, want 1", got)
	}
}

// Cached metadata expires after the TTL, and the cache holds at most
// MaxEntries issuers.
func TestDiscoveryCacheTTLAndBound(t *testing.T) {
	srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		tenant, ok := strings.CutPrefix(r.URL.Path, "/.well-known/oauth-authorization-server/")
		if !ok {
			http.NotFound(w, r)
			return
		}
		authtest.WriteJSON(w, map[string]any{"issuer": s.URL + "/" + tenant, "token_endpoint": "https://as.example/" + tenant})
	})
	fetches := func(tenant string) int {
		return srv.RequestsTo("/.well-known/oauth-authorization-server/" + tenant)
	}
	lookup := func(d *discovery.Resolver, tenant string) {
		t.Helper()
		if _, err := d.Lookup(context.Background(), srv.URL+"/"+tenant); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("bound", func(t *testing.T) {
		d := discovery.NewResolver(discovery.Config{HTTPClient: srv.Client(), MaxEntries: 2})
		for _, tenant := range []string{"a", "b", "c", "c", "b", "a"} {
			lookup(d, tenant)
		}
		// a was evicted for c (it was oldest), so the last lookup of a fetched again.
		if fa, fb, fc := fetches("a"), fetches("b"), fetches("c"); fa != 2 || fb != 1 || fc != 1 {
			t.Errorf("fetches a=%d b=%d c=%d, want 2 1 1", fa, fb, fc)
		}
	})
	t.Run("ttl", func(t *testing.T) {
		// The Resolver's clock, stepped by the test: Lookup runs its fetch
		// on the caller's goroutine, so no lock is needed.
		now := time.Now()
		d := discovery.NewResolver(discovery.Config{HTTPClient: srv.Client(), TTL: time.Hour})
		d.SetClock(func() time.Time { return now })
		lookup(d, "ttl")
		now = now.Add(time.Hour - time.Second)
		lookup(d, "ttl")
		if got := fetches("ttl"); got != 1 {
			t.Fatalf("fetches within the TTL = %d, want 1", got)
		}
		now = now.Add(time.Second)
		lookup(d, "ttl")
		if got := fetches("ttl"); got != 2 {
			t.Fatalf("fetches once the TTL has passed = %d, want 2", got)
		}
	})
}

func TestDiscoveryErrorsAreTyped(t *testing.T) {
	srv := authtest.NewMetadataServer(t, func(_ *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/busy") || strings.HasSuffix(r.URL.Path, "/busy") {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		http.NotFound(w, r)
	})
	d := discovery.NewResolver(discovery.Config{HTTPClient: srv.Client()})
	_, err := d.Lookup(context.Background(), srv.URL+"/busy")
	if !errors.Is(err, discovery.ErrIssuerUnavailable) || errors.Is(err, discovery.ErrIssuerMetadata) {
		t.Errorf("429: %v, want ErrIssuerUnavailable only", err)
	}
	_, err = d.Lookup(context.Background(), srv.URL+"/gone")
	if !errors.Is(err, discovery.ErrIssuerMetadata) || errors.Is(err, discovery.ErrIssuerUnavailable) {
		t.Errorf("404: %v, want ErrIssuerMetadata only", err)
	}
}

func TestMetadataAuthStyle(t *testing.T) {
	for _, tc := range []struct {
		methods []string
		want    string
	}{
		{nil, events.AuthStyleBasic},
		{[]string{"client_secret_basic"}, events.AuthStyleBasic},
		{[]string{"client_secret_post"}, events.AuthStylePost},
		{[]string{"client_secret_post", "client_secret_basic"}, events.AuthStyleBasic},
		{[]string{"none", "private_key_jwt"}, events.AuthStyleBasic},
	} {
		if got := (discovery.Metadata{TokenEndpointAuthMethods: tc.methods}).AuthStyle(); got != tc.want {
			t.Errorf("methods %q: auth style %q, want %q", tc.methods, got, tc.want)
		}
	}
}

// Discovery follows a redirect only where the issuer itself could have
// pointed: https (plain http on loopback only), a host the token-host
// policy allows, at most three hops.
func TestDiscoveryRedirectsStayWithinPolicy(t *testing.T) {
	// target serves a usable document for any issuer it is asked about.
	target := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		authtest.WriteJSON(w, map[string]any{"issuer": r.URL.Query().Get("issuer"), "token_endpoint": "https://as.example/token"})
	})
	var issuer string
	var to func() string
	srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, to(), http.StatusFound)
	})
	issuer = srv.URL
	same := strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)
	loopbackOnly := &egress.Policy{Allowed: []string{"localhost"}, AllowLoopback: true}

	for _, tc := range []struct {
		name   string
		to     func() string
		policy *egress.Policy
		ok     bool
		want   string
	}{
		{"allowed host", func() string { return target.URL + "/doc?issuer=" + issuer }, &egress.Policy{AllowLoopback: true}, true, ""},
		{"host outside the allow-list", func() string { return target.URL + "/doc?issuer=" + issuer }, loopbackOnly, false, "allowed token hosts"},
		{"loopback refused by policy", func() string { return target.URL + "/doc?issuer=" + issuer }, &egress.Policy{}, false, "loopback"},
		{"plain http elsewhere", func() string { return "http://as.example/doc" }, nil, false, "is not https"},
		{"redirect loop", func() string { return same + "/again" }, loopbackOnly, false, "more than 3 redirects"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			to = tc.to
			hc := srv.Client()
			d := discovery.NewResolver(discovery.Config{HTTPClient: hc, Hosts: tc.policy})
			md, err := d.Lookup(context.Background(), issuer)
			if tc.ok {
				if err != nil || md.TokenEndpoint != "https://as.example/token" {
					t.Fatalf("Lookup = %+v, %v; want the redirected document", md, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("the redirect was followed: Lookup = %+v", md)
			}
			if !errors.Is(err, discovery.ErrIssuerMetadata) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Lookup error %v, want ErrIssuerMetadata saying %q", err, tc.want)
			}
		})
	}
}

// Lookup passes on the endpoints a person's login and a revocation use,
// and their absence when the server has none.
func TestLookupReadsLoginAndRevocationEndpoints(t *testing.T) {
	as := authtest.New(t)
	md, err := discovery.NewResolver(discovery.Config{}).Lookup(context.Background(), as.BaseURL())
	if err != nil {
		t.Fatal(err)
	}
	want := discovery.Metadata{
		Issuer:                      as.BaseURL(),
		TokenEndpoint:               as.TokenURL(),
		TokenEndpointAuthMethods:    []string{"client_secret_basic", "client_secret_post"},
		AuthorizationEndpoint:       as.BaseURL() + "/authorize",
		DeviceAuthorizationEndpoint: as.BaseURL() + "/device_authorization",
		RevocationEndpoint:          as.BaseURL() + "/revoke",
	}
	if !reflect.DeepEqual(md, want) {
		t.Errorf("Lookup = %+v\nwant %+v", md, want)
	}

	as.SetRevocation(false)
	md, err = discovery.NewResolver(discovery.Config{}).Lookup(context.Background(), as.BaseURL())
	if err != nil || md.RevocationEndpoint != "" {
		t.Errorf("without revocation: Lookup = %+v, %v; want no revocation endpoint", md, err)
	}
}

func TestEndpointProblem(t *testing.T) {
	for s, want := range map[string]string{
		"https://auth.example.com/token":   "",
		"http://localhost:8080/token":      "",
		"http://127.0.0.2/token":           "",
		"http://[::1]:9/token":             "",
		"http://auth.example.com/token":    "is not https",
		"ftp://auth.example.com/token":     "is not https",
		"https://u:p@auth.example.com/tok": "contains a user name or password",
		"https://auth.example.com/t#frag":  "has a fragment",
		"/token":                           "is not an absolute URL",
		"https://":                         "is not an absolute URL",
	} {
		got := discovery.EndpointProblem(s)
		if want == "" && got != "" || want != "" && !strings.HasPrefix(got, want) {
			t.Errorf("EndpointProblem(%q) = %q, want %q", s, got, want)
		}
	}
}
