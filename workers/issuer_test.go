package workers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
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
			srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != tc.path {
					http.NotFound(w, r)
					return
				}
				authtest.WriteJSON(w, map[string]any{"issuer": s.URL + "/tenants/t1", "token_endpoint": b.AS.TokenURL()})
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
		serve    func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) // nil: the issuer is down
		wantCode string
		want     []string // in the description
	}{
		{
			name:     "404 on both",
			serve:    func(_ *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) },
			wantCode: "400",
			want:     []string{oauthPath + ": HTTP 404", oidcPath + ": HTTP 404", "send token_endpoint instead"},
		},
		{
			name: "bad JSON",
			serve: func(_ *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				w.Write([]byte(`{"issuer": `))
			},
			wantCode: "400",
			want:     []string{oauthPath + ": not a JSON metadata document", oidcPath + ": not a JSON metadata document"},
		},
		{
			name: "issuer mismatch",
			serve: func(_ *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				authtest.WriteJSON(w, map[string]any{"issuer": "https://evil.example", "token_endpoint": "https://evil.example/token"})
			},
			wantCode: "400",
			want:     []string{oauthPath + `: names the issuer "https://evil.example"`, "not identical", oidcPath},
		},
		{
			name: "no token endpoint",
			serve: func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				authtest.WriteJSON(w, map[string]any{"issuer": s.URL})
			},
			wantCode: "400",
			want:     []string{oauthPath + ": has no token_endpoint"},
		},
		{
			name: "plain http token endpoint",
			serve: func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				authtest.WriteJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": "http://as.example/token"})
			},
			wantCode: "400",
			want:     []string{`token_endpoint "http://as.example/token" is not https`},
		},
		{
			name: "5xx",
			serve: func(_ *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
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
				issuer = authtest.NewMetadataServer(t, tc.serve).URL
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
			srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
				md := map[string]any{"issuer": s.URL, "token_endpoint": b.AS.TokenURL()}
				if tc.methods != nil {
					md["token_endpoint_auth_methods_supported"] = tc.methods
				}
				authtest.WriteJSON(w, md)
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
	srv := authtest.NewMetadataServer(t, func(s *authtest.MetadataServer, w http.ResponseWriter, r *http.Request) {
		authtest.WriteJSON(w, map[string]any{"issuer": s.URL, "token_endpoint": b.AS.TokenURL(),
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
