// Package discovery finds an authorization server's endpoints from its
// issuer: its RFC 8414 metadata or, when the server does not publish that,
// its OpenID Connect Discovery document. The refreshers use it to turn a
// registration's issuer into a token endpoint and auth style; the publisher
// uses it to find the authorization, device and revocation endpoints for a
// person's login and a revocation. A Resolver caches the answers per
// issuer.
//
// What the server sends is not trusted: a document counts only when it
// names exactly the issuer asked for and its token endpoint has no
// EndpointProblem, and a redirect is followed only where the issuer itself
// could have pointed.
package discovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/workers/egress"
)

// Errors of Resolver.Lookup. Every lookup error wraps exactly one of them,
// and its text names the issuer, each URL tried and what went wrong there.
var (
	// ErrIssuerUnavailable: the issuer did not answer usefully right now
	// (connection failure, timeout, 408, 429 or 5xx). Retry later; the token
	// service answers it with CodeUnavailable (503).
	ErrIssuerUnavailable = errors.New("authorization server metadata unavailable")
	// ErrIssuerMetadata: the issuer answered, but with no usable metadata
	// (404 on both well-known URLs, malformed JSON, an issuer that differs
	// from the one asked for, a missing or plain-http token endpoint).
	// Retrying will not help; the token service answers it with
	// CodeInvalidRequest (400) naming the field issuer.
	ErrIssuerMetadata = errors.New("authorization server metadata unusable")
)

// Resolver defaults.
const (
	// DefaultTTL is how long discovered metadata is reused.
	DefaultTTL = time.Hour
	// DefaultTimeout bounds one lookup, all URLs tried included. It is
	// short because a registration waits for it.
	DefaultTimeout = 5 * time.Second
	// DefaultMaxEntries bounds how many issuers are cached.
	DefaultMaxEntries = 1000
	// maxMetadataSize bounds a metadata document; real ones are a few KiB.
	maxMetadataSize = 256 << 10
)

// Metadata is the part of an authorization server's metadata (RFC 8414 §2,
// OpenID Connect Discovery §3) that authbus uses. Lookup checks Issuer and
// TokenEndpoint; the other endpoints are passed on as the server wrote
// them, and whoever sends something there checks them (EndpointProblem).
type Metadata struct {
	// Issuer is the issuer identifier; it equals the one looked up.
	Issuer string `json:"issuer"`
	// TokenEndpoint is the token endpoint URL: https, or http on loopback.
	TokenEndpoint string `json:"token_endpoint"`
	// TokenEndpointAuthMethods lists the client authentication methods the
	// token endpoint supports; empty means client_secret_basic (RFC 8414).
	TokenEndpointAuthMethods []string `json:"token_endpoint_auth_methods_supported,omitempty"`
	// AuthorizationEndpoint is where a person logs in (RFC 6749 §3.1); ""
	// when the server offers no authorization code grant.
	AuthorizationEndpoint string `json:"authorization_endpoint,omitempty"`
	// DeviceAuthorizationEndpoint starts the device authorization grant
	// (RFC 8628 §4); "" when the server offers none.
	DeviceAuthorizationEndpoint string `json:"device_authorization_endpoint,omitempty"`
	// RevocationEndpoint revokes tokens (RFC 7009, RFC 8414 §2); "" when
	// the server has none.
	RevocationEndpoint string `json:"revocation_endpoint,omitempty"`
}

// AuthStyle is the auth_style a registration gets when it sets none:
// client_secret_basic when the server supports it (the default method of
// RFC 6749 §2.3.1), else client_secret_post when supported, else basic.
func (m Metadata) AuthStyle() string {
	if !slices.Contains(m.TokenEndpointAuthMethods, "client_secret_basic") &&
		slices.Contains(m.TokenEndpointAuthMethods, "client_secret_post") {
		return events.AuthStylePost
	}
	return events.AuthStyleBasic
}

// Config configures a Resolver. Zero values mean the defaults.
type Config struct {
	// HTTPClient fetches metadata; nil means http.DefaultClient. Its
	// CheckRedirect is replaced by the Resolver's own rule.
	HTTPClient *http.Client
	// TTL is how long metadata is reused; 0 means DefaultTTL.
	TTL time.Duration
	// Timeout bounds one lookup; 0 means DefaultTimeout.
	Timeout time.Duration
	// MaxEntries bounds the cache; 0 means DefaultMaxEntries.
	MaxEntries int
	// Hosts, when set, is the policy a redirect target must pass (its host
	// and the addresses it resolves to) before a redirect is followed; nil
	// checks only the scheme. A refresher sets its token-host policy here
	// (workers.Config.TokenHosts).
	Hosts *egress.Policy
}

// maxDiscoveryRedirects bounds the redirects one metadata fetch follows.
const maxDiscoveryRedirects = 3

// maxReflected bounds how much of a value a server sent (an issuer, a URL)
// an error reply repeats: the document may be 256 KiB of anything.
const maxReflected = 200

// Resolver finds an authorization server's metadata from its issuer and
// caches the answer per issuer. Concurrent lookups of one issuer share a
// single fetch. Failures are not cached, so a repaired issuer works on the
// next registration. It is safe for concurrent use.
type Resolver struct {
	client  *http.Client
	ttl     time.Duration
	timeout time.Duration
	max     int
	now     func() time.Time

	flight singleflight.Group

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	md      Metadata
	expires time.Time
}

// NewResolver returns a Resolver with an empty cache.
func NewResolver(cfg Config) *Resolver {
	d := &Resolver{
		client:  cfg.HTTPClient,
		ttl:     cfg.TTL,
		timeout: cfg.Timeout,
		max:     cfg.MaxEntries,
		now:     time.Now,
		cache:   make(map[string]cached),
	}
	if d.client == nil {
		d.client = http.DefaultClient
	}
	// A metadata fetch is a GET to a URL a runtime chose, and parts of the
	// answer come back in error replies: a redirect is followed only where
	// the request itself could have gone.
	c := *d.client
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		return checkRedirect(req, via, cfg.Hosts)
	}
	d.client = &c
	if d.ttl <= 0 {
		d.ttl = DefaultTTL
	}
	if d.timeout <= 0 {
		d.timeout = DefaultTimeout
	}
	if d.max <= 0 {
		d.max = DefaultMaxEntries
	}
	return d
}

// Lookup returns the metadata of issuer, from the cache when it is fresh.
// Otherwise it fetches {scheme://host}/.well-known/oauth-authorization-server{path}
// (RFC 8414 §3.1) and, when that yields no usable document, the OpenID
// Connect location {issuer}/.well-known/openid-configuration. A document is
// usable when its issuer is identical to the one asked for (RFC 8414 §3.3)
// and its token endpoint is https (http on loopback only). Errors wrap
// ErrIssuerUnavailable or ErrIssuerMetadata.
func (d *Resolver) Lookup(ctx context.Context, issuer string) (Metadata, error) {
	if md, ok := d.cached(issuer); ok {
		return md, nil
	}
	v, err, _ := d.flight.Do(issuer, func() (any, error) {
		// A lookup that finished while this one waited for the flight.
		if md, ok := d.cached(issuer); ok {
			return md, nil
		}
		// Not the caller's cancellation: the fetch is shared with other
		// callers, and it is bounded by its own timeout.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.timeout)
		defer cancel()
		md, err := d.fetch(fctx, issuer)
		if err == nil {
			d.store(issuer, md)
		}
		return md, err
	})
	if err != nil {
		return Metadata{}, err
	}
	return v.(Metadata), nil
}

func (d *Resolver) cached(issuer string) (Metadata, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, ok := d.cache[issuer]
	if !ok || !d.now().Before(c.expires) {
		return Metadata{}, false
	}
	return c.md, true
}

func (d *Resolver) store(issuer string, md Metadata) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	if _, ok := d.cache[issuer]; !ok && len(d.cache) >= d.max {
		// Full: drop what has expired, else the entry closest to expiry.
		// A linear scan is fine: lookups happen on registration only.
		oldest := ""
		for k, c := range d.cache {
			if !now.Before(c.expires) {
				delete(d.cache, k)
			} else if oldest == "" || c.expires.Before(d.cache[oldest].expires) {
				oldest = k
			}
		}
		if len(d.cache) >= d.max {
			delete(d.cache, oldest)
		}
	}
	d.cache[issuer] = cached{md: md, expires: now.Add(d.ttl)}
}

// checkRedirect allows a metadata redirect within the rules the issuer
// itself had to pass: at most maxDiscoveryRedirects, https (plain http only
// to loopback), and a host the token-host policy allows.
func checkRedirect(req *http.Request, via []*http.Request, hosts *egress.Policy) error {
	if len(via) >= maxDiscoveryRedirects {
		return fmt.Errorf("%w: more than %d redirects", errRedirectRefused, maxDiscoveryRedirects)
	}
	target := events.TruncateText(req.URL.Redacted(), maxReflected)
	if p := EndpointProblem(req.URL.String()); p != "" {
		return fmt.Errorf("%w: redirect to %s: it %s", errRedirectRefused, target, p)
	}
	if hosts != nil {
		if err := hosts.CheckEndpoint(req.Context(), req.URL.String()); err != nil {
			return fmt.Errorf("%w: redirect to %s: %w", errRedirectRefused, target, err)
		}
	}
	return nil
}

// errRedirectRefused marks a redirect checkRedirect did not follow: the
// issuer answered, with a redirect it may not make.
var errRedirectRefused = errors.New("redirect refused")

// wellKnownURLs returns the metadata URLs of issuer in the order Lookup
// tries them: the RFC 8414 location, with the well-known segment inserted
// between host and path, then the OpenID Connect location, appended to the
// issuer's path.
func wellKnownURLs(issuer string) ([]string, error) {
	u, err := url.Parse(issuer)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("issuer %q is not an absolute URL; send one such as https://auth.example.com", issuer)
	}
	path := strings.TrimSuffix(u.EscapedPath(), "/")
	base := u.Scheme + "://" + u.Host
	return []string{
		base + "/.well-known/oauth-authorization-server" + path,
		base + path + "/.well-known/openid-configuration",
	}, nil
}

// fetch tries the well-known URLs in order and returns the first usable
// document.
func (d *Resolver) fetch(ctx context.Context, issuer string) (Metadata, error) {
	urls, err := wellKnownURLs(issuer)
	if err != nil {
		return Metadata{}, fmt.Errorf("%w: %w", err, ErrIssuerMetadata)
	}
	var tried []string
	transient := false
	for _, u := range urls {
		md, problem, retry, answered := d.try(ctx, issuer, u)
		if problem == "" {
			return md, nil
		}
		tried = append(tried, u+": "+problem)
		transient = transient || retry
		if !answered {
			break // the host did not speak HTTP at all; the other URL is on it too
		}
	}
	if transient {
		return Metadata{}, fmt.Errorf("issuer %q: no metadata (%s); the authorization server is not answering, retry the registration shortly or send token_endpoint instead: %w",
			issuer, strings.Join(tried, "; "), ErrIssuerUnavailable)
	}
	return Metadata{}, fmt.Errorf("issuer %q: no usable metadata (%s); check the issuer (it must equal the \"issuer\" of the server's metadata, RFC 8414) or send token_endpoint instead: %w",
		issuer, strings.Join(tried, "; "), ErrIssuerMetadata)
}

// try fetches one metadata URL. problem is "" for a usable document;
// otherwise retry says whether trying later might help, and answered whether
// the server answered over HTTP at all.
func (d *Resolver) try(ctx context.Context, issuer, u string) (md Metadata, problem string, retry, answered bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return md, err.Error(), false, false
	}
	req.Header.Set("Accept", "application/json")
	resp, err := d.client.Do(req)
	if err != nil {
		if errors.Is(err, errRedirectRefused) {
			return md, unwrapURLError(err), false, true
		}
		if errors.Is(err, egress.ErrRefused) {
			return md, "refused by the token host policy (" + unwrapURLError(err) + ")", false, false
		}
		if ctx.Err() != nil {
			return md, fmt.Sprintf("no answer within %v", d.timeout), true, false
		}
		return md, "unreachable (" + unwrapURLError(err) + ")", true, false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMetadataSize+1))
	switch {
	case err != nil:
		return md, "answer cut off (" + err.Error() + ")", true, true
	case resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return md, fmt.Sprintf("HTTP %d", resp.StatusCode), true, true
	case resp.StatusCode != http.StatusOK:
		return md, fmt.Sprintf("HTTP %d", resp.StatusCode), false, true
	case len(body) > maxMetadataSize:
		return md, fmt.Sprintf("document larger than %d KiB", maxMetadataSize>>10), false, true
	}
	if err := json.Unmarshal(body, &md); err != nil {
		return Metadata{}, "not a JSON metadata document (" + err.Error() + ")", false, true
	}
	switch {
	case md.Issuer != issuer:
		return Metadata{}, fmt.Sprintf("names the issuer %q, which is not identical to the one registered (RFC 8414 §3.3)", events.TruncateText(md.Issuer, maxReflected)), false, true
	case md.TokenEndpoint == "":
		return Metadata{}, "has no token_endpoint", false, true
	}
	if p := EndpointProblem(md.TokenEndpoint); p != "" {
		return Metadata{}, fmt.Sprintf("token_endpoint %q %s", events.TruncateText(md.TokenEndpoint, maxReflected), p), false, true
	}
	return md, "", false, true
}

// EndpointProblem says why the endpoint URL s may not be sent a client
// secret or a token, as a phrase to follow the URL ("is not https …"), or
// "" when it may. The rule is the register request's for token_endpoint:
// an absolute https URL, plain http only on loopback (local test servers),
// without user name, password or fragment.
func EndpointProblem(s string) string {
	u, err := url.Parse(s)
	switch {
	case err != nil || u.Scheme == "" || u.Hostname() == "":
		return "is not an absolute URL"
	case u.User != nil:
		return "contains a user name or password"
	case u.Fragment != "" || strings.Contains(s, "#"):
		return "has a fragment"
	case u.Scheme == "https":
		return ""
	case u.Scheme == "http" && events.IsLoopbackHost(u.Hostname()):
		return ""
	}
	return "is not https (plain http is allowed only on localhost, 127.0.0.0/8 and ::1)"
}

// unwrapURLError drops the "Get \"url\":" prefix of a *url.Error: the URL is
// already named next to it.
func unwrapURLError(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return err.Error()
}
