package workers_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/workers"
)

// A token endpoint that answers a refresh with a redirect does not get the
// refresh token (or, in post style, the client secret) sent on to where it
// points: the redirect is the answer, a permanent unexpected_response.
func TestTokenRequestFollowsNoRedirect(t *testing.T) {
	for _, status := range []int{http.StatusTemporaryRedirect, http.StatusPermanentRedirect, http.StatusFound} {
		t.Run(http.StatusText(status), func(t *testing.T) {
			t.Parallel()
			b := fleet.Setup(t)
			elsewhere := authtest.New(t)
			elsewhere.AddClient(fleet.ClientID, fleet.ClientSecret)
			b.StartPools(t, 1, nil)
			key := fleet.MustKey(t, "acme.alice.github")
			tok := b.AS.Issue(fleet.ClientID)
			b.Register(t, key, tok, func(r *events.RegisterRequest) { r.AuthStyle = events.AuthStylePost })
			w := b.Watch(t, key)

			b.AS.Fail(1, status, "", http.Header{"Location": {elsewhere.TokenURL()}})
			b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
			ev := w.WaitFor(t, "auth.needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
			b.Settled(t)
			if n := elsewhere.Calls(); n != 0 {
				t.Fatalf("the redirect was followed: %d calls reached its target with the refresh token and client secret", n)
			}
			if ev.NeedsReauth.Reason != "unexpected_response" || !strings.Contains(ev.NeedsReauth.ErrorDescription, "redirect") {
				t.Errorf("needs_reauth %+v, want unexpected_response describing the redirect", ev.NeedsReauth)
			}
			if n := b.AS.Calls(); n != 1 {
				t.Errorf("token-endpoint calls = %d, want 1", n)
			}
		})
	}
}

// Discovery follows a redirect only where the issuer itself could have
// pointed: https (plain http on loopback only), a host the token-host
// policy allows, at most three hops.
func TestDiscoveryRedirectsStayWithinPolicy(t *testing.T) {
	// target serves a usable document for any issuer it is asked about.
	target := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"issuer": r.URL.Query().Get("issuer"), "token_endpoint": "https://as.example/token"})
	})
	var issuer string
	var to func() string
	srv := newMetadataServer(t, func(s *metadataServer, w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, to(), http.StatusFound)
	})
	issuer = srv.URL
	same := strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)
	loopbackOnly := &workers.TokenHostPolicy{Allowed: []string{"localhost"}, AllowLoopback: true}

	for _, tc := range []struct {
		name   string
		to     func() string
		policy *workers.TokenHostPolicy
		ok     bool
		want   string
	}{
		{"allowed host", func() string { return target.URL + "/doc?issuer=" + issuer }, &workers.TokenHostPolicy{AllowLoopback: true}, true, ""},
		{"host outside the allow-list", func() string { return target.URL + "/doc?issuer=" + issuer }, loopbackOnly, false, "allowed token hosts"},
		{"loopback refused by policy", func() string { return target.URL + "/doc?issuer=" + issuer }, &workers.TokenHostPolicy{}, false, "loopback"},
		{"plain http elsewhere", func() string { return "http://as.example/doc" }, nil, false, "is not https"},
		{"redirect loop", func() string { return same + "/again" }, loopbackOnly, false, "more than 3 redirects"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			to = tc.to
			hc := srv.Client()
			d := workers.NewDiscovery(workers.DiscoveryConfig{HTTPClient: hc, TokenHosts: tc.policy})
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
			if !errors.Is(err, workers.ErrIssuerMetadata) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Lookup error %v, want ErrIssuerMetadata saying %q", err, tc.want)
			}
		})
	}
}
