package workers

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers/egress"
)

// exchange makes the one token-endpoint call of a refresh, through the
// endpoint's breaker, bounded by the token timeout.
func (p *Pool) exchange(ctx context.Context, c *kv.Credential) (*oauth2.Token, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.TokenTimeout)
	defer cancel()
	hc := p.cfg.HTTPClient
	// x/oauth2 sends no extra parameters on a refresh, not even the scopes:
	// RFC 8707 wants the resource on every token request, and the scopes
	// registered are the ones to ask for (RFC 6749 §6), so add them on the
	// wire. The client_credentials grant sends its scopes itself.
	add := url.Values{}
	if c.Resource != "" {
		add.Set("resource", c.Resource)
	}
	if c.Grant != events.GrantClientCredentials && len(c.Scopes) > 0 {
		add.Set("scope", strings.Join(c.Scopes, " "))
	}
	call := *hc
	call.Transport = readableExpiry{transportOf(hc)}
	if len(add) > 0 {
		call.Transport = formParams{base: call.Transport, add: add}
	}
	// Whatever client the pool was given: a redirect is answered, never
	// followed (see egress.RefuseRedirect); classify makes it permanent.
	call.CheckRedirect = egress.RefuseRedirect
	ctx = context.WithValue(ctx, oauth2.HTTPClient, &call)
	start := time.Now()
	tok, err := p.breakers.do(ctx, breakerKeyOf(c), func(ctx context.Context) (*oauth2.Token, error) {
		if c.Grant == events.GrantClientCredentials {
			cc := clientcredentials.Config{
				ClientID:     c.ClientID,
				ClientSecret: c.ClientSecret.Reveal(),
				TokenURL:     c.TokenEndpoint,
				Scopes:       c.Scopes,
				AuthStyle:    authStyle(c.AuthStyle),
			}
			return cc.Token(ctx)
		}
		cfg := oauth2.Config{
			ClientID:     c.ClientID,
			ClientSecret: c.ClientSecret.Reveal(),
			// Always explicit: AuthStyleAutoDetect repeats a failed refresh
			// with the same refresh token in the other style, a reuse that
			// rotating servers punish.
			Endpoint: oauth2.Endpoint{TokenURL: c.TokenEndpoint, AuthStyle: authStyle(c.AuthStyle)},
			Scopes:   c.Scopes,
		}
		return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: c.RefreshToken.Reveal()}).Token()
	})
	p.metrics.tokenCalled(ctx, c.TokenEndpoint, time.Since(start), err)
	return tok, err
}

// breakerKeyOf names the breakers a refresh of c passes (see breakers).
func breakerKeyOf(c *kv.Credential) callKey {
	return callKey{endpoint: c.TokenEndpoint, tenant: c.Key.Tenant, client: c.ClientID}
}

func authStyle(s string) oauth2.AuthStyle {
	if s == events.AuthStylePost {
		return oauth2.AuthStyleInParams
	}
	return oauth2.AuthStyleInHeader
}

func transportOf(c *http.Client) http.RoundTripper {
	if c.Transport != nil {
		return c.Transport
	}
	return http.DefaultTransport
}

// formParams adds parameters to form-encoded POST bodies.
type formParams struct {
	base http.RoundTripper
	add  url.Values
}

func (f formParams) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodPost || r.Body == nil ||
		!strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") {
		return f.base.RoundTrip(r)
	}
	raw, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(raw))
	if err != nil {
		return nil, err
	}
	for k, vs := range f.add {
		form[k] = vs
	}
	enc := form.Encode()
	r2 := r.Clone(r.Context())
	r2.Body = io.NopCloser(strings.NewReader(enc))
	r2.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(enc)), nil }
	r2.ContentLength = int64(len(enc))
	return f.base.RoundTrip(r2)
}

// maxAnswerSize is what x/oauth2 reads of a token answer.
const maxAnswerSize = 1 << 20

// readableExpiry rewrites an expires_in that x/oauth2 cannot read into one
// it can. x/oauth2 reads only an integer (3600 or "3600"): 3600.0, 1e30
// or "soon" make the whole answer unreadable, a transient failure whose
// retry presents a refresh token the answer had just redeemed. A number
// of any form becomes an integer, clamped to ±2^31−1 seconds; anything
// else is dropped, as if the server had sent no expires_in. inspect then
// decides what the lifetime is worth. Other answers pass untouched.
type readableExpiry struct{ base http.RoundTripper }

func (t readableExpiry) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err != nil || resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp, err
	}
	// The form-encoded answers x/oauth2 knows read expires_in leniently.
	switch ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); ct {
	case "application/x-www-form-urlencoded", "text/plain":
		return resp, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerSize))
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	var answer map[string]json.RawMessage
	if json.Unmarshal(body, &answer) != nil {
		return resp, nil // x/oauth2 reports it
	}
	raw, ok := answer["expires_in"]
	if !ok {
		return resp, nil
	}
	if fixed, changed := readableSeconds(raw); changed {
		if fixed == nil {
			delete(answer, "expires_in")
		} else {
			answer["expires_in"] = fixed
		}
		if body, err = json.Marshal(answer); err != nil {
			return nil, err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Del("Content-Length")
	}
	return resp, nil
}

// readableSeconds returns expires_in as an integer literal x/oauth2 reads
// as the same number of seconds (nil: drop it), and whether that differs
// from raw.
func readableSeconds(raw json.RawMessage) (json.RawMessage, bool) {
	s := string(bytes.TrimSpace(raw))
	if s == "null" {
		return raw, false // x/oauth2 reads null as absent
	}
	if unq, err := strconv.Unquote(s); err == nil {
		s = strings.TrimSpace(unq)
	}
	if n, err := strconv.ParseInt(s, 10, 32); err == nil && s == strconv.FormatInt(n, 10) && string(raw) == s {
		return raw, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) {
		return nil, true
	}
	f = max(min(f, math.MaxInt32), -math.MaxInt32)
	return json.RawMessage(strconv.FormatInt(int64(f), 10)), true
}
