package workers

import (
	"context"
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/metric/noop"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

// tokenAnswer is one fuzzed token-endpoint answer.
type tokenAnswer struct {
	status      int
	retryAfter  string
	contentType string
	body        []byte
}

// FuzzTokenResponse sends any HTTP answer of a token endpoint (status,
// Retry-After, Content-Type, body) through the pool's real exchange (x/oauth2,
// the breaker, the form-parameter transport) over a real HTTP connection and
// checks what classify makes of it: no panic; a verdict that agrees with the
// status as the design's classification rule says; a Retry-After that is
// never negative and is the server's own value when it is delay-seconds.
func FuzzTokenResponse(f *testing.F) {
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"Bearer","refresh_token":"rt-2","expires_in":3600}`))
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"bearer"}`)) // Dex: lower case, no rotation
	f.Add(200, "", "application/x-www-form-urlencoded", []byte(`access_token=at-2&token_type=bearer&expires_in=60`))
	f.Add(200, "", "application/json", []byte(`{"token_type":"Bearer"}`)) // no access token
	f.Add(200, "", "application/json", []byte(`{"error":"invalid_grant"}`))
	f.Add(400, "", "application/json", []byte(`{"error":"invalid_grant","error_description":"refresh token reused"}`))
	f.Add(400, "", "application/json", []byte(`{"error":"invalid_request"}`)) // Dex reuse
	f.Add(403, "", "application/json", []byte(`{"error":"invalid_grant"}`))   // Auth0
	f.Add(401, "", "application/json", []byte(`{"error":"invalid_client"}`))
	f.Add(400, "", "text/html", []byte(`<html>Bad Request</html>`))
	f.Add(404, "", "text/plain", []byte(`error=not_found`))
	f.Add(408, "", "", []byte(nil))
	f.Add(429, "2", "application/json", []byte(`{"error":"slow_down"}`))
	f.Add(429, "Wed, 21 Oct 2037 07:28:00 GMT", "", []byte(nil))
	f.Add(503, "120", "text/html", []byte(`<h1>maintenance</h1>`))
	f.Add(500, "", "application/json", []byte(`{"error":"invalid_request"}`)) // Dex concurrent loser
	f.Add(302, "", "", []byte(nil))
	// Hostile successes: absurd lifetimes, tokens that cannot be announced.
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"Bearer","expires_in":-5}`))
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"Bearer","expires_in":1e30}`))
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"Bearer","expires_in":"3600.5"}`))
	f.Add(200, "", "application/x-www-form-urlencoded", []byte(`access_token=at-2&token_type=bearer&expires_in=99999999999999`))
	f.Add(200, "", "application/json", []byte(`{"access_token":"at\u0000-2","token_type":"Bearer"}`))
	f.Add(200, "", "application/json", []byte(`{"access_token":"at-2","token_type":"Bearer x"}`))

	var (
		answers sync.Map // path → tokenAnswer
		next    atomic.Int64
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a, ok := answers.Load(r.URL.Path)
		if !ok {
			http.Error(w, "unknown answer", http.StatusTeapot)
			return
		}
		ta := a.(tokenAnswer)
		if ta.retryAfter != "" {
			w.Header().Set("Retry-After", ta.retryAfter)
		}
		if ta.contentType != "" {
			w.Header().Set("Content-Type", ta.contentType)
		}
		w.WriteHeader(ta.status)
		_, _ = w.Write(ta.body)
	}))
	f.Cleanup(srv.Close)

	p := &Pool{
		cfg: Config{TokenTimeout: 10 * time.Second, HTTPClient: srv.Client()},
		// Never trips: every input must reach the server.
		breakers: newBreakers(math.MaxUint32, time.Minute, nil),
	}
	var err error
	if p.metrics, err = newMetrics(noop.NewMeterProvider(), p); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, status int, retryAfterHeader, contentType string, body []byte) {
		// Final statuses only: 1xx are interim answers the server sends
		// before a 200 of its own.
		if status < 200 || status > 599 {
			status = 200 + int(uint(status)%400)
		}
		path := "/token/" + strconv.FormatInt(next.Add(1), 10)
		answers.Store(path, tokenAnswer{status, retryAfterHeader, contentType, body})
		defer answers.Delete(path)

		c := &kv.Credential{
			TokenEndpoint: srv.URL + path,
			ClientID:      "client",
			ClientSecret:  "client-secret",
			RefreshToken:  "rt-1",
			AuthStyle:     events.AuthStyleBasic,
			Scopes:        []string{"read"},
			Resource:      "https://mcp.example.com/mcp",
		}
		before := time.Now()
		tok, err := p.exchange(context.Background(), c)
		o := classify(err)
		after := time.Now()

		// The classification rule of the design, by the status the
		// client actually received.
		var re *oauth2.RetrieveError
		got := status
		switch {
		case err == nil:
		case errors.As(err, &re) && re.Response != nil:
			got = re.Response.StatusCode
		default:
			got = 0 // no HTTP answer that x/oauth2 could report
		}
		switch {
		case err == nil:
			if o.verdict != rotated {
				t.Fatalf("success classified as %d", o.verdict)
			}
			if status < 200 || status > 299 || tok == nil || tok.AccessToken == "" {
				t.Fatalf("HTTP %d gave a token %v without an access token, or from a failure status", status, tok != nil)
			}
			checkIssued(t, tok, after)
		case o.verdict == breakerOpen || o.verdict == canceled:
			t.Fatalf("HTTP %d classified as %d; no breaker can be open and nothing was canceled: %v", status, o.verdict, err)
		case got == 0:
			// A malformed 2xx answer (no access token, unparsable body):
			// the server may be fine in a moment.
			if o.verdict != transient {
				t.Fatalf("HTTP %d without a RetrieveError (%v) classified as %d, want transient", status, err, o.verdict)
			}
		case got == http.StatusRequestTimeout || got == http.StatusTooManyRequests || got >= 500:
			if o.verdict != transient {
				t.Fatalf("HTTP %d classified as %d, want transient", got, o.verdict)
			}
		case (got == 400 || got == 401 || got == 403) && re.ErrorCode != "":
			if o.verdict != permanent || o.reason != re.ErrorCode {
				t.Fatalf("HTTP %d error %q classified as %d reason %q, want permanent with that reason", got, re.ErrorCode, o.verdict, o.reason)
			}
		default:
			// Other answers (other 4xx, 2xx with an error code, 3xx): the
			// server is up and said no; only a person can tell why.
			if o.verdict != permanent || o.reason == "" || o.description == "" {
				t.Fatalf("HTTP %d classified as %+v, want permanent with a reason and a description", got, o)
			}
		}
		if o.status != got && err != nil {
			t.Fatalf("outcome status %d, answer status %d", o.status, got)
		}

		// Retry-After, as the client received it (the server turns line
		// breaks into spaces, the client trims).
		if o.retryAfter < 0 {
			t.Fatalf("Retry-After %q gave the negative delay %v", retryAfterHeader, o.retryAfter)
		}
		if re == nil || re.Response == nil || o.verdict != transient {
			if o.retryAfter != 0 {
				t.Fatalf("Retry-After %v taken from a %d answer", o.retryAfter, got)
			}
			return
		}
		checkRetryAfter(t, re.Response.Header.Get("Retry-After"), o.retryAfter, before, after)
	})
}

// checkRetryAfter checks the delay d that classify took from the header
// value v, between the times before and after the call.
func checkRetryAfter(t *testing.T, v string, d time.Duration, before, after time.Time) {
	t.Helper()
	if secs, err := strconv.ParseUint(v, 10, 64); err == nil {
		// Delay-seconds: the server's value exactly when it is
		// representable; never a wrapped-around one.
		if secs <= uint64(math.MaxInt64/int64(time.Second)) {
			if d != time.Duration(secs)*time.Second {
				t.Fatalf("Retry-After %q gave %v, want %ds", v, d, secs)
			}
		} else if d != 0 && d < 24*time.Hour {
			t.Fatalf("Retry-After %q (too large to represent) gave %v, a shorter wait than asked", v, d)
		}
		return
	}
	if at, err := http.ParseTime(v); err == nil {
		// An HTTP date: the time left until then, as seen during the call.
		if at.After(after) && (d > at.Sub(before) || d < at.Sub(after)) {
			t.Fatalf("Retry-After %q gave %v, want about %v", v, d, at.Sub(after))
		}
		if !at.After(before) && d != 0 {
			t.Fatalf("Retry-After %q in the past gave %v, want 0", v, d)
		}
		return
	}
	if v == "" && d != 0 {
		t.Fatalf("no Retry-After gave %v", d)
	}
}

// checkIssued checks what inspect makes of a token received at now: an
// expiry that is none or a safe lifetime away, and either a token that
// announces or a problem that does, as a needs_reauth description.
func checkIssued(t *testing.T, tok *oauth2.Token, now time.Time) {
	t.Helper()
	got := inspect(tok, now)
	if !got.expiresAt.IsZero() {
		if life := got.expiresAt.Sub(now); life < minTokenLifetime || life > maxTokenLifetime {
			t.Fatalf("expires_in %d (expiry %v) gave a lifetime of %v, outside %v–%v", tok.ExpiresIn, tok.Expiry, life, minTokenLifetime, maxTokenLifetime)
		}
	}
	key := events.Key{Tenant: "acme", User: "alice", Server: "github"}
	if got.problem != "" {
		nr := events.NeedsReauth{Reason: reasonUnusableToken,
			ErrorDescription: events.TruncateText(got.problem, events.MaxErrorDescriptionLen), Version: 1}
		if _, err := events.Encode(key, "authbus/refresher/fuzz", nr); err != nil {
			t.Fatalf("the problem %q cannot be announced: %v", got.problem, err)
		}
		return
	}
	if _, err := events.Encode(key, "authbus/refresher/fuzz", events.Rotated{AccessToken: tok.AccessToken, TokenType: got.tokenType,
		ExpiresAt: got.expiresAt, Fingerprint: events.Fingerprint(tok.AccessToken), Version: 2}); err != nil {
		t.Fatalf("a token inspect let through cannot be announced: %v", err)
	}
}
