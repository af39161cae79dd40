package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/authbus/authbus/events"
)

// Transport is an http.RoundTripper that sends each request with the current
// token of Source, and recovers from a 401 once:
//
//  1. It reports the refused token (auth.401 with its fingerprint, this
//     runtime's name, the status and the URL without query or user info),
//     unless a newer token has already arrived.
//  2. It asks auth.token at once and, unless that already answers another
//     token, waits for a token with a different fingerprint, at most as
//     long as WithWaitTimeout and the request's context allow (see
//     Source.Replacement).
//  3. It sends the request again with that token, once. A second 401 is
//     returned to the caller as it is.
//
// A request whose body cannot be replayed (a body without GetBody) is not
// retried: its 401 is reported, so that later requests get a new token, and
// returned. When the credential needs a new login the request fails with a
// *NeedsReauthError, at once if that is already known. Other errors wrap
// ErrTimeout, ErrUnavailable, ErrNotFound, ErrRefused or ErrClosed.
//
// A Transport is safe for concurrent use; many goroutines that see the same
// 401 report it once and share the wait.
type Transport struct {
	// Source provides the tokens (required).
	Source *Source
	// Base sends the requests; nil means http.DefaultTransport.
	Base http.RoundTripper
}

// maxDrain bounds how much of a 401 body is read so its connection can be
// reused; a longer body costs a new connection instead.
const maxDrain = 64 << 10

// errWaitBound is the cause of the wait's own deadline, to tell it from the
// request's.
var errWaitBound = errors.New("wait bound reached")

// RoundTrip implements http.RoundTripper. It does not modify req: each
// attempt sends a clone.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	s := t.Source
	if s == nil {
		closeBody(req)
		return nil, errors.New("client.Transport: Source is nil; create one with client.New")
	}
	ctx := req.Context()
	used, err := s.current(ctx)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	resp, err := t.base().RoundTrip(authorized(req, used, req.Body))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}

	if req.Body != nil && req.Body != http.NoBody && req.GetBody == nil {
		// The body is spent and cannot be sent again. Report the 401
		// unless a newer token is already here, so the next request works.
		if st := s.snapshot(); st.tok != nil && st.tok.Fingerprint == used.Fingerprint {
			if err := s.reportShared(ctx, refusal(used, req)); err != nil {
				s.log.Warn("reporting a 401 failed", "fingerprint", used.Fingerprint, "error", err)
			}
		}
		return resp, nil
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
	resp.Body.Close()

	next, err := s.renew(ctx, refusal(used, req), used.Version)
	if err != nil {
		return nil, err
	}
	body := req.Body
	if req.GetBody != nil && body != nil && body != http.NoBody {
		if body, err = req.GetBody(); err != nil {
			return nil, fmt.Errorf("client: replaying %s %s after a 401: GetBody: %w", req.Method, cleanURL(req.URL), err)
		}
	}
	return t.base().RoundTrip(authorized(req, next, body))
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// authorized returns a clone of req with body and tok's Authorization header.
func authorized(req *http.Request, tok events.Rotated, body io.ReadCloser) *http.Request {
	r := req.Clone(req.Context())
	r.Body = body
	oauthToken(tok).SetAuthHeader(r)
	return r
}

// closeBody closes the request body, as a RoundTripper must even when it
// fails before sending.
func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// cleanURL is u without user info, query and fragment, which may hold
// secrets, at most events.MaxURLLen bytes.
func cleanURL(u *url.URL) string {
	c := *u
	c.User, c.RawQuery, c.ForceQuery, c.Fragment, c.RawFragment = nil, "", false, "", ""
	s := c.String()
	if len(s) > events.MaxURLLen {
		s = s[:events.MaxURLLen]
	}
	return s
}

// refusal is what the 401 of req, sent with used, reports.
func refusal(used events.Rotated, req *http.Request) Refusal {
	return Refusal{Fingerprint: used.Fingerprint, Status: http.StatusUnauthorized, URL: cleanURL(req.URL)}
}

// waitError explains why the wait after a 401 ended without a token.
func (s *Source) waitError(ctx context.Context, err error) error {
	switch {
	case errors.Is(context.Cause(ctx), errWaitBound):
		return fmt.Errorf("client: no new token for %s within %v after a 401: %w; check that refreshers are running and the token endpoint answers, or raise WithWaitTimeout",
			s.key, s.cfg.wait, ErrTimeout)
	case ctx.Err() != nil:
		return fmt.Errorf("client: waiting for a new token for %s after a 401: %w", s.key, ctx.Err())
	default:
		return err
	}
}
