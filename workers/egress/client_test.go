package egress_test

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"

	"github.com/authbus/authbus/workers/egress"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// The client hands a redirect back as the answer: following it would send
// a token request's body (the refresh token, the client secret) on.
func TestClientFollowsNoRedirect(t *testing.T) {
	var followed atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/elsewhere" {
			followed.Add(1)
			return
		}
		http.Redirect(w, r, "/elsewhere", http.StatusTemporaryRedirect)
	}))
	defer srv.Close()
	hc := egress.Policy{AllowLoopback: true}.Client(1, discard)
	defer hc.CloseIdleConnections()
	resp, err := hc.Post(srv.URL+"/token", "application/x-www-form-urlencoded", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTemporaryRedirect || followed.Load() != 0 {
		t.Errorf("status %d, redirect followed %d times; want the 307 itself, never followed", resp.StatusCode, followed.Load())
	}
}

// The client's dialer applies the policy: loopback is refused unless
// allowed.
func TestClientEnforcesPolicy(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	for _, tc := range []struct {
		policy egress.Policy
		ok     bool
	}{
		{egress.Policy{}, false},
		{egress.Policy{AllowLoopback: true}, true},
	} {
		hc := tc.policy.Client(1, discard)
		resp, err := hc.Get(srv.URL)
		if err == nil {
			resp.Body.Close()
		}
		hc.CloseIdleConnections()
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, egress.ErrRefused) {
			t.Errorf("%+v: GET %s: err %v, want ok=%v (else ErrRefused)", tc.policy, srv.URL, err, tc.ok)
		}
	}
}
