package workers

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/oauth2"

	"github.com/authbus/authbus/events"
)

// verdict is what a token-endpoint answer means for the credential.
type verdict int

const (
	// rotated: the server issued a token.
	rotated verdict = iota
	// permanent: the server answered correctly that this refresh can never
	// succeed; only a person logging in again can fix it (after the
	// lost-race re-read).
	permanent
	// transient: try again later, with the same refresh token.
	transient
	// breakerOpen: no call was made; the endpoint is failing.
	breakerOpen
	// canceled: we gave up the call ourselves (shutdown); not the server's fault.
	canceled
)

// answer is what a token-endpoint call came to, as classify reads it.
type answer struct {
	verdict     verdict
	reason      string        // OAuth error code, or unexpected_response
	description string        // error_description as the server gave it
	retryAfter  time.Duration // the server's Retry-After, 0 when absent
	status      int           // HTTP status, 0 when there was no answer
}

// classify is the one place that decides what an error from a token-endpoint
// call means. Everything else (the breaker, the pool, the metrics) asks it.
//
// 400/401/403 with an OAuth error code are permanent with that code as the
// reason; redirects (3xx) and other 4xx except 408 and 429 are permanent
// "unexpected_response"; 408, 429, 5xx, timeouts and connection errors are
// transient.
func classify(err error) answer {
	if err == nil {
		return answer{verdict: rotated}
	}
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		return answer{verdict: breakerOpen}
	}
	if errors.Is(err, context.Canceled) {
		return answer{verdict: canceled}
	}
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.Response == nil {
		// Timeouts, refused connections, resets, malformed 200 answers: the
		// server may be fine in a moment.
		return answer{verdict: transient}
	}
	o := answer{status: re.Response.StatusCode, reason: re.ErrorCode, description: re.ErrorDescription}
	switch s := re.Response.StatusCode; {
	case s == http.StatusRequestTimeout || s == http.StatusTooManyRequests || s >= 500:
		o.verdict = transient
		o.retryAfter = retryAfter(re.Response.Header.Get("Retry-After"), time.Now())
	case (s == http.StatusBadRequest || s == http.StatusUnauthorized || s == http.StatusForbidden) && re.ErrorCode != "":
		o.verdict = permanent
	case s >= 300 && s < 400:
		// Token requests follow no redirect (egress.RefuseRedirect): the refresh
		// token must not travel on to wherever the answer points.
		o.verdict, o.reason = permanent, "unexpected_response"
		o.description = "token endpoint answered HTTP " + strconv.Itoa(s) +
			", a redirect; authbus does not follow redirects of token requests (they would re-send the refresh token and client secret): register the token endpoint's final URL"
	default:
		o.verdict = permanent
		o.reason = "unexpected_response"
		if o.description == "" {
			o.description = "token endpoint answered HTTP " + strconv.Itoa(s) + " without an OAuth error code"
		}
	}
	return o
}

// retryAfter parses a Retry-After header: delay-seconds or an HTTP date.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil {
		if secs < 0 {
			return 0
		}
		if secs > int(math.MaxInt64/int64(time.Second)) {
			// Beyond what a Duration holds: the longest wait there is,
			// never a wrapped-around negative one.
			return math.MaxInt64
		}
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// maxRetryAfter bounds how long a Retry-After holds an event back: a server
// asking for days (or an overflowing header) must not park a credential
// past the point where its token expires and a person notices.
const maxRetryAfter = time.Hour

// The lifetimes authbus believes of an issued token, whatever expires_in
// said. A lifetime shorter than minTokenLifetime would make the proactive
// refresh fire every second, forever (a negative one stored a token that
// had always expired: every event refreshed it again); with it, a
// credential is refreshed at most every 5 s or so (half its lifetime). A
// longer one than maxTokenLifetime is no promise anyone keeps. A missing, zero,
// negative or unreadable expires_in means no expiry is known: the token is
// refreshed when a runtime reports a 401, as RFC 6749 leaves it.
const (
	minTokenLifetime = 10 * time.Second
	maxTokenLifetime = 365 * 24 * time.Hour
)

// maxRefreshTokenSize bounds a refresh token authbus keeps: sealed, it must
// fit a credential record in one NATS message. Real ones are a few KiB.
const maxRefreshTokenSize = 64 << 10

// reasonUnusableToken is the needs_reauth reason of an answer that issued
// tokens authbus cannot announce or keep.
const reasonUnusableToken = "unusable_token"

// issued is what a token-endpoint answer that issued a token comes to.
type issued struct {
	expiresAt time.Time // zero: no expiry known
	tokenType string    // as the server gave it, "Bearer" when it gave none
	problem   string    // why the token cannot be announced or kept; "" when it can
}

// inspect judges a successful answer received at now: the expiry to store
// (see minTokenLifetime) and whether its tokens can be announced (an
// access token and token type that fit auth.rotated) and kept (a refresh
// token that fits a record). It is pure, like classify.
func inspect(tok *oauth2.Token, now time.Time) issued {
	got := issued{tokenType: tok.TokenType}
	if got.tokenType == "" {
		got.tokenType = "Bearer"
	}
	var lifetime time.Duration
	switch {
	case tok.ExpiresIn != 0:
		// expires_in as read from JSON, clamped before it can overflow.
		const maxSecs = int64(maxTokenLifetime / time.Second)
		lifetime = time.Duration(min(max(tok.ExpiresIn, -1), maxSecs+1)) * time.Second
	case !tok.Expiry.IsZero():
		// A form-encoded answer: x/oauth2 made it a time when the answer
		// arrived, and large seconds wrap around into any time at all.
		lifetime = tok.Expiry.Sub(now)
	}
	switch {
	case lifetime <= 0:
		// No expiry known.
	case lifetime < minTokenLifetime:
		got.expiresAt = now.Add(minTokenLifetime).UTC()
	case lifetime > maxTokenLifetime:
		got.expiresAt = now.Add(maxTokenLifetime).UTC()
	default:
		got.expiresAt = now.Add(lifetime).UTC()
	}

	announced := events.Rotated{AccessToken: tok.AccessToken, TokenType: got.tokenType,
		Fingerprint: events.Fingerprint(tok.AccessToken), Version: 1}
	if err := announced.Validate(); err != nil {
		got.problem = "the token endpoint issued a token that cannot be announced (" +
			strings.TrimSuffix(err.Error(), ": "+events.ErrInvalidEvent.Error()) + ")"
	} else if n := len(tok.RefreshToken); n > maxRefreshTokenSize {
		got.problem = fmt.Sprintf("the token endpoint issued a refresh_token of %d bytes, which cannot be kept (at most %d)", n, maxRefreshTokenSize)
	}
	if got.problem != "" {
		got.problem += "; the refresh token was redeemed, so no retry can help: fix what the authorization server issues, then log in again and register the new tokens"
	}
	return got
}
