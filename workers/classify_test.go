package workers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/oauth2"
)

func retrieveError(status int, code string, header http.Header) error {
	if header == nil {
		header = http.Header{}
	}
	return fmt.Errorf("refresh: %w", &oauth2.RetrieveError{
		Response:  &http.Response{StatusCode: status, Header: header},
		ErrorCode: code,
	})
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		name       string
		err        error
		verdict    verdict
		reason     string
		retryAfter time.Duration
	}{
		{"success", nil, rotated, "", 0},
		{"400 invalid_grant", retrieveError(400, "invalid_grant", nil), permanent, "invalid_grant", 0},
		{"403 invalid_grant (Auth0)", retrieveError(403, "invalid_grant", nil), permanent, "invalid_grant", 0},
		{"400 invalid_request (Dex reuse)", retrieveError(400, "invalid_request", nil), permanent, "invalid_request", 0},
		{"401 invalid_client", retrieveError(401, "invalid_client", nil), permanent, "invalid_client", 0},
		{"400 without a code", retrieveError(400, "", nil), permanent, "unexpected_response", 0},
		{"404", retrieveError(404, "", nil), permanent, "unexpected_response", 0},
		{"307 redirect", retrieveError(307, "", http.Header{"Location": {"https://elsewhere.example/token"}}), permanent, "unexpected_response", 0},
		{"308 redirect with a code", retrieveError(308, "invalid_grant", nil), permanent, "unexpected_response", 0},
		{"408", retrieveError(408, "", nil), transient, "", 0},
		{"429 Retry-After seconds", retrieveError(429, "", http.Header{"Retry-After": {"2"}}), transient, "", 2 * time.Second},
		{"500 invalid_request (Dex concurrent loser)", retrieveError(500, "invalid_request", nil), transient, "invalid_request", 0},
		{"503", retrieveError(503, "", nil), transient, "", 0},
		{"connection refused", &url.Error{Op: "Post", URL: "http://127.0.0.1:1/token", Err: errors.New("connection refused")}, transient, "", 0},
		{"timeout", fmt.Errorf("refresh: %w", context.DeadlineExceeded), transient, "", 0},
		{"our own cancellation", fmt.Errorf("refresh: %w", context.Canceled), canceled, "", 0},
		{"breaker open", gobreaker.ErrOpenState, breakerOpen, "", 0},
		{"breaker half-open busy", gobreaker.ErrTooManyRequests, breakerOpen, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := classify(tc.err)
			if o.verdict != tc.verdict || o.retryAfter != tc.retryAfter || (tc.reason != "" && o.reason != tc.reason) {
				t.Errorf("classify = %+v, want verdict %d reason %q retryAfter %v", o, tc.verdict, tc.reason, tc.retryAfter)
			}
		})
	}
}

func TestRetryAfterHTTPDate(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	if got := retryAfter(now.Add(90*time.Second).Format(http.TimeFormat), now); got != 90*time.Second {
		t.Errorf("Retry-After as a date: %v, want 90s", got)
	}
	for _, v := range []string{"", "-3", "soon", now.Add(-time.Minute).Format(http.TimeFormat)} {
		if got := retryAfter(v, now); got != 0 {
			t.Errorf("Retry-After %q: %v, want 0", v, got)
		}
	}
}

// A server that answers permanent OAuth errors is healthy: they must never
// open a breaker, while transient failures must.
func TestBreakerCountsOnlyTransientFailures(t *testing.T) {
	bs := newBreakers(3, time.Minute, nil)
	k := callKey{endpoint: "https://as.example/token", tenant: "acme", client: "c1"}
	fail := func(err error) func(context.Context) (*oauth2.Token, error) {
		return func(context.Context) (*oauth2.Token, error) { return nil, err }
	}
	for range 10 {
		_, _ = bs.do(context.Background(), k, fail(retrieveError(400, "invalid_grant", nil)))
		_, _ = bs.do(context.Background(), k, fail(fmt.Errorf("x: %w", context.Canceled)))
	}
	if bs.open(k) {
		t.Fatal("permanent OAuth errors and cancellations opened a breaker")
	}
	for range 3 {
		_, _ = bs.do(context.Background(), k, fail(retrieveError(503, "", nil)))
	}
	if !bs.open(k) {
		t.Fatal("3 consecutive 503s did not open the breaker")
	}
	if bs.open(callKey{endpoint: "https://other.example/token", tenant: "acme", client: "c1"}) {
		t.Error("one endpoint's failures opened another endpoint's breaker")
	}
}
