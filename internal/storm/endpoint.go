package storm

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/authbus/authbus/internal/authserver"
)

// clientPrefix names the OAuth client of each credential at the built-in
// server: one client per credential (as one MCP server or API per
// credential would have), so the server's call log says which credential
// every call was for, whoever made it.
const clientPrefix = "storm-c"

// endpoint is the token endpoint one mode refreshes against: a fresh
// built-in authorization server per mode, so that its counts are that mode's
// alone, or a real one.
type endpoint struct {
	cfg   Config
	as    *authserver.Server // nil for a real endpoint
	url   string
	grant string // the events.Grant* value credentials are registered with
	tr    *timingTransport
	hc    *http.Client
}

func newEndpoint(cfg Config) (*endpoint, error) {
	e := &endpoint{cfg: cfg, url: cfg.TokenURL, grant: "client_credentials"}
	if cfg.TokenURL == "" {
		as, err := authserver.Start("127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("start the built-in authorization server: %w", err)
		}
		e.as = as
		e.as.SetReuse(cfg.Reuse)
		e.as.SetLatency(cfg.Latency)
		for i := range cfg.Credentials {
			id, secret := e.client(i)
			e.as.AddClient(id, secret)
		}
		e.url = e.as.TokenURL()
		e.grant = "refresh_token"
	}
	// Enough idle connections for every caller at once: with the default
	// two per host most calls would open a new connection (measured: 20–40 %
	// fewer refreshes per second).
	conns := max(cfg.Publishers, cfg.Pools*cfg.Workers, cfg.Processes) + 8
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.MaxIdleConnsPerHost, base.MaxIdleConns = conns, 2*conns
	e.tr = &timingTransport{base: base}
	e.hc = &http.Client{Transport: e.tr, Timeout: 30 * time.Second}
	return e, nil
}

func (e *endpoint) close() {
	e.tr.base.CloseIdleConnections()
	if e.as != nil {
		e.as.Close()
	}
}

// client is the OAuth client of credential i.
func (e *endpoint) client(i int) (id, secret string) {
	if e.as == nil {
		return e.cfg.ClientID, e.cfg.ClientSecret
	}
	return clientPrefix + strconv.Itoa(i), "storm-secret-" + strconv.Itoa(i)
}

// issue returns the tokens of credential i as a login would hand them out.
// A real endpoint gets no login: its credentials start from a made-up access
// token, and the first 401 fetches a real one.
func (e *endpoint) issue(run string, i int) (authserver.Tokens, error) {
	if e.as == nil {
		return authserver.Tokens{AccessToken: fmt.Sprintf("storm-%s-initial-%d", run, i), TokenType: "Bearer"}, nil
	}
	id, _ := e.client(i)
	return e.as.Issue(id)
}

// newFailures queues the configured 503s for the start of a wave.
func (e *endpoint) newFailures() {
	if e.as != nil && e.cfg.Failures > 0 {
		e.as.Fail(e.cfg.Failures, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	}
}

// refresh is the one x/oauth2 call every mode but authbus makes itself: the
// same call the refresher makes (explicit auth style, HTTP client in the
// context).
func (e *endpoint) refresh(ctx context.Context, i int, refreshToken string) (*oauth2.Token, error) {
	ctx = context.WithValue(ctx, oauth2.HTTPClient, e.hc)
	id, secret := e.client(i)
	if e.as == nil {
		cc := clientcredentials.Config{ClientID: id, ClientSecret: secret, TokenURL: e.url, AuthStyle: oauth2.AuthStyleInHeader}
		return cc.Token(ctx)
	}
	cfg := oauth2.Config{ClientID: id, ClientSecret: secret,
		// Explicit: auto-detection repeats a failed refresh in the other
		// style, a reuse that would spoil the count.
		Endpoint: oauth2.Endpoint{TokenURL: e.url, AuthStyle: oauth2.AuthStyleInHeader}}
	return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: refreshToken}).Token()
}

// calls is the number of token-endpoint calls so far: the server's own
// count, or the calls this process made through its transport.
func (e *endpoint) calls() int {
	if e.as != nil {
		return e.as.Calls()
	}
	return e.tr.count()
}

// reuses is the number of spent refresh tokens presented again; -1 when
// unknown (a real endpoint does not tell).
func (e *endpoint) reuses() int {
	if e.as == nil {
		return -1
	}
	return e.as.Reuses()
}

// callTimes returns when each call arrived.
func (e *endpoint) callTimes() []time.Time {
	if e.as == nil {
		return e.tr.starts()
	}
	log := e.as.CallLog()
	out := make([]time.Time, len(log))
	for i, c := range log {
		out[i] = c.At
	}
	return out
}

// perGeneration counts the calls of every credential in every wave. Wave w
// holds calls [bounds[w], bounds[w+1]) in arrival order: a wave starts only
// after the previous one settled. A credential generation that got no call
// counts as 0. With a real endpoint the calls cannot be told apart by
// credential: only the mean is known and ok is false.
func (e *endpoint) perGeneration(k int, bounds []int) (s Spread, ok bool) {
	waves := len(bounds) - 1
	if e.as == nil {
		total := bounds[waves] - bounds[0]
		return Spread{Mean: float64(total) / float64(k*waves)}, false
	}
	log := e.as.CallLog()
	counts := make([]int, k*waves)
	for w := range waves {
		for _, c := range log[bounds[w]:min(bounds[w+1], len(log))] {
			i, err := strconv.Atoi(strings.TrimPrefix(c.ClientID, clientPrefix))
			if err != nil || i < 0 || i >= k {
				continue
			}
			counts[w*k+i]++
		}
	}
	return spreadOf(counts), true
}

// timingTransport counts token-endpoint calls made by this process and how
// long each took, the endpoint's own time as the caller sees it.
type timingTransport struct {
	base *http.Transport
	mu   sync.Mutex
	at   []time.Time
	took []time.Duration
}

func (t *timingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.base.RoundTrip(r)
	took := time.Since(start)
	t.mu.Lock()
	t.at = append(t.at, start)
	t.took = append(t.took, took)
	t.mu.Unlock()
	return resp, err
}

func (t *timingTransport) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.took)
}

func (t *timingTransport) starts() []time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.at)
}

// since returns the durations of the calls after the first n.
func (t *timingTransport) since(n int) []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.took[min(n, len(t.took)):])
}
