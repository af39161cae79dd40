package workers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// issuerOf makes a registration name the issuer instead of the token
// endpoint, so the refresher has to discover it.
func issuerOf(issuer string) func(*events.RegisterRequest) {
	return func(r *events.RegisterRequest) { r.TokenEndpoint, r.Issuer = "", issuer }
}

// registerRaw sends a registration and returns the error code header (""
// on success) and the decoded reply or error reply.
func registerRaw(t *testing.T, b *fleet.Fleet, key events.Key, tok authtest.Tokens, tune func(*events.RegisterRequest)) (string, events.RegisterReply, events.ErrorReply) {
	t.Helper()
	req := events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, TokenType: tok.TokenType, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: b.AS.TokenURL(),
		ClientID:      fleet.ClientID,
		ClientSecret:  fleet.ClientSecret,
	}
	tune(&req)
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	code, data := b.Request(t, b.Subj.Register(key), body)
	var ok events.RegisterReply
	var bad events.ErrorReply
	if code == "" {
		err = json.Unmarshal(data, &ok)
	} else {
		err = json.Unmarshal(data, &bad)
	}
	if err != nil {
		t.Fatalf("reply %s: %v", data, err)
	}
	return code, ok, bad
}

// metadataServer is a stand-in issuer whose discovery documents a test
// writes by hand. It counts the requests per path.
type metadataServer struct {
	*httptest.Server
	mu    sync.Mutex
	paths map[string]int
}

func newMetadataServer(t *testing.T, h func(s *metadataServer, w http.ResponseWriter, r *http.Request)) *metadataServer {
	t.Helper()
	s := &metadataServer{paths: map[string]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.paths[r.URL.Path]++
		s.mu.Unlock()
		h(s, w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *metadataServer) requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.paths {
		n += c
	}
	return n
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// An issuer that publishes only the OpenID Connect document (as Dex does)
// is found through the fallback; the discovered endpoint and auth style are
// stored explicitly, and the next refresh calls that endpoint.
func TestRegisterWithIssuerServingOnlyOpenIDConfiguration(t *testing.T) {
	b := fleet.Setup(t)
	b.AS.SetMetadata(false, true)
	b.StartPools(t, 1, nil)
	key := fleet.MustKey(t, "acme.oidc.github")
	tok := b.AS.Issue(fleet.ClientID)

	code, reply, er := registerRaw(t, b, key, tok, issuerOf(b.AS.BaseURL()))
	if code != "" {
		t.Fatalf("register with issuer: %s %+v", code, er)
	}
	if reply.Version != 1 || reply.Fingerprint != events.Fingerprint(tok.AccessToken) {
		t.Errorf("reply %+v, want version 1 and the token's fingerprint", reply)
	}
	if got := b.AS.MetadataCalls(); got != 2 {
		t.Errorf("metadata requests = %d, want 2 (RFC 8414 location answered 404, then openid-configuration)", got)
	}
	c := b.Cred(t, key)
	if c.TokenEndpoint != b.AS.TokenURL() || c.AuthStyle != events.AuthStyleBasic {
		t.Errorf("stored token endpoint %q auth style %q, want %q and %q", c.TokenEndpoint, c.AuthStyle, b.AS.TokenURL(), events.AuthStyleBasic)
	}

	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
	ev := w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
	if !b.AS.ValidAccessToken(ev.Rotated.AccessToken) {
		t.Error("the token from the discovered endpoint is not valid at the authorization server")
	}
	if got := b.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
}

// A second registration against the same issuer reuses the cached metadata.
func TestRegisterWithIssuerCachesMetadata(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	for i, user := range []string{"alice", "bob", "alice"} {
		code, _, er := registerRaw(t, b, fleet.MustKey(t, "acme."+user+".github"), b.AS.Issue(fleet.ClientID), issuerOf(b.AS.BaseURL()))
		if code != "" {
			t.Fatalf("registration %d: %s %+v", i, code, er)
		}
	}
	if got := b.AS.MetadataCalls(); got != 1 {
		t.Errorf("metadata requests for three registrations = %d, want 1", got)
	}
}

// The issuer's path goes after the well-known segment for RFC 8414 and
// before it for OpenID Connect.
func TestRegisterWithIssuerWithPath(t *testing.T) {
	for _, tc := range []struct{ name, path string }{
		{"RFC 8414", "/.well-known/oauth-authorization-server/tenants/t1"},
		{"OpenID Connect", "/tenants/t1/.well-known/openid-configuration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := fleet.Setup(t)
			b.StartPools(t, 1, nil)
			srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != tc.path {
					http.NotFound(w, r)
					return
				}
				writeJSON(w, map[string]any{"issuer": s.URL + "/tenants/t1", "token_endpoint": b.AS.TokenURL()})
			})
			key := fleet.MustKey(t, "acme.path.github")
			if code, _, er := registerRaw(t, b, key, b.AS.Issue(fleet.ClientID), issuerOf(srv.URL+"/tenants/t1")); code != "" {
				t.Fatalf("register: %s %+v", code, er)
			}
			if got := b.Cred(t, key).TokenEndpoint; got != b.AS.TokenURL() {
				t.Errorf("stored token endpoint %q, want %q", got, b.AS.TokenURL())
			}
		})
	}
}

// A broken issuer is refused with an answer that names the field, the URLs
// tried and what to do: 400 when the server answered but with nothing usable,
// 503 when it may recover by itself.
func TestRegisterWithBrokenIssuer(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	const oauthPath, oidcPath = "/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()

	for _, tc := range []struct {
		name     string
		serve    func(s *metadataServer, w http.ResponseWriter, r *http.Request) // nil: the issuer is down
		wantCode string
		want     []string // in the description
	}{
		{
			name:     "404 on both",
			serve:    func(_ *metadataServer, w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) },
			wantCode: "400",
			want:     []string{oauthPath + ": HTTP 404", oidcPath + ": HTTP 404", "send token_endpoint instead"},
		},
		{
			name: "bad JSON",
			serve: func(_ *metadataServer, w http.ResponseWriter, r *http.Request) {
				w.Write([]byte(`{"issuer": `))
			},
			wantCode: "400",
			want:     []string{oauthPath + ": not a JSON metadata document", oidcPath + ": not a JSON metadata document"},
		},
		{
			name: "issuer mismatch",
			serve: func(_ *metadataServer, w http.ResponseWriter, r *http.Request) {
				writeJSON(w, map[string]any{"issuer": "https://evil.example", "token_endpoint": "https://evil.example/token"})
			},
			wantCode: "400",
			want:     []string{oauthPath + `: names the issuer "https://evil.example"`, "not identical", oidcPath},
		},
		{
			name: "no token endpoint",
			serve: func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
				writeJSON(w, map[string]any{"issuer": s.URL})
			},
			wantCode: "400",
			want:     []string{oauthPath + ": has no token_endpoint"},
		},
		{
			name: "plain http token endpoint",
			serve: func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
				writeJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": "http://as.example/token"})
			},
			wantCode: "400",
			want:     []string{`token_endpoint "http://as.example/token" is not https`},
		},
		{
			name: "5xx",
			serve: func(_ *metadataServer, w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusServiceUnavailable)
			},
			wantCode: "503",
			want:     []string{oauthPath + ": HTTP 503", oidcPath + ": HTTP 503", "retry the registration shortly"},
		},
		{
			name:     "down",
			wantCode: "503",
			want:     []string{downURL + oauthPath + ": unreachable", "retry the registration shortly"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			issuer := downURL
			if tc.serve != nil {
				issuer = newMetadataServer(t, tc.serve).URL
			}
			key := fleet.MustKey(t, "acme.broken.github")
			code, _, er := registerRaw(t, b, key, b.AS.Issue(fleet.ClientID), issuerOf(issuer))
			if code != tc.wantCode {
				t.Fatalf("code %q, want %q; reply %+v", code, tc.wantCode, er)
			}
			if er.Error != events.CodeOf(tc.wantCode) {
				t.Errorf("error %q, want %q", er.Error, events.CodeOf(tc.wantCode))
			}
			for _, w := range append(tc.want, `field "issuer"`, fmt.Sprintf("issuer %q", issuer)) {
				if !strings.Contains(er.ErrorDescription, w) {
					t.Errorf("description does not contain %q:\n%s", w, er.ErrorDescription)
				}
			}
			if _, _, err := b.Store.Get(context.Background(), key); err == nil {
				t.Error("a refused registration was stored")
			}
		})
	}
}

// auth_style defaults from token_endpoint_auth_methods_supported, and a
// request that sets it keeps its own.
func TestRegisterWithIssuerAuthStyle(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	for _, tc := range []struct {
		name    string
		methods []string
		request string
		want    string
	}{
		{"basic preferred", []string{"client_secret_post", "client_secret_basic"}, "", events.AuthStyleBasic},
		{"post when only post", []string{"private_key_jwt", "client_secret_post"}, "", events.AuthStylePost},
		{"basic when unlisted", nil, "", events.AuthStyleBasic},
		{"basic when nothing fits", []string{"private_key_jwt"}, "", events.AuthStyleBasic},
		{"request wins", []string{"client_secret_basic"}, events.AuthStylePost, events.AuthStylePost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
				md := map[string]any{"issuer": s.URL, "token_endpoint": b.AS.TokenURL()}
				if tc.methods != nil {
					md["token_endpoint_auth_methods_supported"] = tc.methods
				}
				writeJSON(w, md)
			})
			key := fleet.MustKey(t, "acme.style.github")
			code, _, er := registerRaw(t, b, key, b.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) {
				issuerOf(srv.URL)(r)
				r.AuthStyle = tc.request
			})
			if code != "" {
				t.Fatalf("register: %s %+v", code, er)
			}
			if got := b.Cred(t, key).AuthStyle; got != tc.want {
				t.Errorf("stored auth_style %q, want %q", got, tc.want)
			}
		})
	}
}

// A post-only client refreshes with the auth style discovery chose: the
// refresh authenticates in the form, not with HTTP Basic.
func TestDiscoveredPostAuthStyleIsUsedOnRefresh(t *testing.T) {
	b := fleet.Setup(t)
	b.StartPools(t, 1, nil)
	srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": b.AS.TokenURL(),
			"token_endpoint_auth_methods_supported": []string{"client_secret_post"}})
	})
	var basic atomic.Bool
	b.AS.OnToken(func(r *http.Request) {
		if _, _, ok := r.BasicAuth(); ok {
			basic.Store(true)
		}
	})
	key := fleet.MustKey(t, "acme.post.github")
	tok := b.AS.Issue(fleet.ClientID)
	if code, _, er := registerRaw(t, b, key, tok, issuerOf(srv.URL)); code != "" {
		t.Fatalf("register: %s %+v", code, er)
	}
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt-1", true)
	w.WaitFor(t, "auth.rotated version 2", fleet.RotatedVersion(2))
	log := b.AS.CallLog()
	if len(log) != 1 || log[0].Form.Get("client_secret") != fleet.ClientSecret || basic.Load() {
		t.Errorf("refresh did not authenticate with client_secret_post (calls %d, basic %v)", len(log), basic.Load())
	}
}

// Concurrent lookups of one issuer make one fetch.
func TestDiscoveryConcurrentLookupsFetchOnce(t *testing.T) {
	release := make(chan struct{})
	arrived := make(chan struct{}, 100)
	srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		writeJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": "https://as.example/token"})
	})
	d := workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: srv.Client()})
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
	if got := srv.requests(); got != 1 {
		t.Errorf("metadata requests = %d, want 1", got)
	}
}

// Cached metadata expires after the TTL, and the cache holds at most
// MaxEntries issuers.
func TestDiscoveryCacheTTLAndBound(t *testing.T) {
	srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
		tenant, ok := strings.CutPrefix(r.URL.Path, "/.well-known/oauth-authorization-server/")
		if !ok {
			http.NotFound(w, r)
			return
		}
		writeJSON(w, map[string]any{"issuer": s.URL + "/" + tenant, "token_endpoint": "https://as.example/" + tenant})
	})
	fetches := func(tenant string) int {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		return srv.paths["/.well-known/oauth-authorization-server/"+tenant]
	}
	lookup := func(d *workers.Discovery, tenant string) {
		t.Helper()
		if _, err := d.Lookup(context.Background(), srv.URL+"/"+tenant); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("bound", func(t *testing.T) {
		d := workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: srv.Client(), MaxEntries: 2})
		for _, tenant := range []string{"a", "b", "c", "c", "b", "a"} {
			lookup(d, tenant)
		}
		// a was evicted for c (it was oldest), so the last lookup of a fetched again.
		if fa, fb, fc := fetches("a"), fetches("b"), fetches("c"); fa != 2 || fb != 1 || fc != 1 {
			t.Errorf("fetches a=%d b=%d c=%d, want 2 1 1", fa, fb, fc)
		}
	})
	t.Run("ttl", func(t *testing.T) {
		// Within the TTL: an hour, so that a busy machine cannot outlast it.
		d := workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: srv.Client(), TTL: time.Hour})
		lookup(d, "ttl-long")
		lookup(d, "ttl-long")
		if got := fetches("ttl-long"); got != 1 {
			t.Fatalf("fetches within the TTL = %d, want 1", got)
		}
		d = workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: srv.Client(), TTL: 50 * time.Millisecond})
		lookup(d, "ttl")
		fleet.Eventually(t, 5*time.Second, "the cached metadata expires", func() bool {
			lookup(d, "ttl")
			return fetches("ttl") == 2
		})
	})
}

func TestDiscoveryErrorsAreTyped(t *testing.T) {
	srv := newMetadataServer(t, func(_ *metadataServer, w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/busy") || strings.HasSuffix(r.URL.Path, "/busy") {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		http.NotFound(w, r)
	})
	d := workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: srv.Client()})
	_, err := d.Lookup(context.Background(), srv.URL+"/busy")
	if !errors.Is(err, workers.ErrIssuerUnavailable) || errors.Is(err, workers.ErrIssuerMetadata) {
		t.Errorf("429: %v, want ErrIssuerUnavailable only", err)
	}
	_, err = d.Lookup(context.Background(), srv.URL+"/gone")
	if !errors.Is(err, workers.ErrIssuerMetadata) || errors.Is(err, workers.ErrIssuerUnavailable) {
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
		if got := (workers.Metadata{TokenEndpointAuthMethods: tc.methods}).AuthStyle(); got != tc.want {
			t.Errorf("methods %q: auth style %q, want %q", tc.methods, got, tc.want)
		}
	}
}
