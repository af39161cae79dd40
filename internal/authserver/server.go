// Package authserver is an OAuth 2.0 authorization server for development
// and tests that answers the way real ones do (Dex, node oidc-provider,
// Auth0, Okta, Ory Hydra, AWS Cognito): refresh-token rotation or none, the
// different answers to a spent refresh token being presented again, reuse
// grace intervals, revocation of a whole token family, answers without
// refresh_token or expires_in, latency, queued 5xx/429 failures, lost
// answers and a crashed server.
//
// A person logs in with the authorization code grant and PKCE (RFC 7636,
// S256 only) through a consent page, or with the device authorization grant
// (RFC 8628) through a verification page; tokens are revoked at a
// revocation endpoint (RFC 7009); RFC 8414 metadata lists every endpoint.
// There are no user accounts: whoever approves on the consent page is the
// one user, which is why Start listens on loopback addresses only.
//
// `publisher devserver` runs one for a newcomer to log in against, `publisher
// storm` runs one per mode as the token endpoint it measures, and the tests
// use it through internal/authtest, asserting on what it counted: how many
// token calls arrived (Calls), how many presented a refresh token that was
// already redeemed (Reuses), and what each call carried and got (CallLog).
// The counts are exact under any concurrency: every token call is recorded
// when it arrives and its outcome is recorded before the answer is written,
// so a client that has its answer always finds it in the log.
//
// All methods of Server are safe for concurrent use.
package authserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"
)

// ReuseMode says how the server answers a refresh token that was already
// redeemed (rotation on) and is presented again outside any reuse interval.
type ReuseMode int

const (
	// ReuseInvalidGrant answers 400 {"error":"invalid_grant"} and revokes
	// nothing (Okta, Ory Hydra, AWS Cognito). It is the default.
	ReuseInvalidGrant ReuseMode = iota
	// ReuseInvalidGrant403 answers 403 {"error":"invalid_grant"} (Auth0).
	ReuseInvalidGrant403
	// ReuseDexInvalidRequest answers 400 {"error":"invalid_request"} and
	// revokes nothing (Dex).
	ReuseDexInvalidRequest
	// ReuseRevokeFamily answers 400 {"error":"invalid_grant"} and revokes the
	// whole token family (node oidc-provider): the family's newest refresh
	// token and all of its access tokens stop working too.
	ReuseRevokeFamily
)

// reuseNames are the names ParseReuseMode accepts, in ReuseMode order.
var reuseNames = [...]string{"invalid_grant", "invalid_grant_403", "dex", "revoke_family"}

// ReuseModeNames lists the names ParseReuseMode accepts, for help texts.
const ReuseModeNames = "invalid_grant, invalid_grant_403 (Auth0), dex (400 invalid_request), revoke_family (node oidc-provider)"

// ParseReuseMode parses a reuse mode's name, as command-line flags give it.
func ParseReuseMode(s string) (ReuseMode, error) {
	for i, n := range reuseNames {
		if n == s {
			return ReuseMode(i), nil
		}
	}
	return 0, fmt.Errorf("reuse mode %q is unknown; use %s", s, ReuseModeNames)
}

// String returns the name ParseReuseMode accepts.
func (m ReuseMode) String() string {
	if m < 0 || int(m) >= len(reuseNames) {
		return fmt.Sprintf("ReuseMode(%d)", int(m))
	}
	return reuseNames[m]
}

// Errors of the methods that act on the server's state directly.
var (
	// ErrUnknownClient: Issue for a client that AddClient did not add.
	ErrUnknownClient = errors.New("authserver: unknown client")
	// ErrUnknownToken: Revoke of a token this server never issued.
	ErrUnknownToken = errors.New("authserver: unknown token")
	// ErrNotLoopback: Start on an address other machines could reach.
	ErrNotLoopback = errors.New("authserver: not a loopback address")
)

// Tokens are the tokens of a new grant, as an interactive login would hand
// them to a client (see Server.Issue).
type Tokens struct {
	AccessToken  string
	RefreshToken string
	TokenType    string
	ExpiresIn    int64 // seconds; 0 when the server is set to omit expires_in
}

// Call is the record of one token-endpoint call, as returned by
// Server.CallLog.
type Call struct {
	At           time.Time // arrival, on the server's clock (see SetClock)
	GrantType    string
	ClientID     string // the client the call claimed to be, authenticated or not
	RefreshToken string // as presented
	// Status is the HTTP status the server answered (or would have answered,
	// when Dropped). It is 0 while the call is in progress, and stays 0 when
	// the call never got as far as an answer (SetDown, or the client went
	// away during the latency wait).
	Status  int
	Error   string // OAuth error code answered, "" on success
	Reuse   bool   // a refresh token that was already redeemed was presented
	Dropped bool   // no answer reached the client: connection closed (SetDown, DropAnswers) or client gone
	// Form is the whole form as received (the POST body; the query for other
	// methods), so tests can check resource and scope parameters.
	Form url.Values
}

// Server is a running authorization server. Create it with Start and stop
// it with Close; its settings may be changed at any time, also while calls
// are in progress, and apply to calls that arrive afterwards. It is safe
// for concurrent use.
type Server struct {
	http    *http.Server
	base    string          // http://127.0.0.1:port, also the issuer
	hosts   map[string]bool // Host headers the pages answer; see ownHost
	client  *http.Client
	closing chan struct{} // closed by Close, to end latency waits
	served  sync.WaitGroup
	closed  sync.Once

	// handlers counts the handlers in flight; entry is refused once
	// stopping is set, so Close's Wait never races an Add.
	handlers sync.WaitGroup
	entry    sync.RWMutex
	stopping bool

	mu sync.Mutex

	// Settings.
	rotation       bool
	reuse          ReuseMode
	reuseInterval  time.Duration
	latency        time.Duration
	expiresIn      int64
	tokenType      string
	down           bool
	now            func() time.Time
	onToken        func(*http.Request)
	onCall         func(Call)
	fails          []reply                          // answers queued by Fail, oldest first
	clientFails    map[string]reply                 // see FailClient
	rewrite        func(map[string]json.RawMessage) // see RewriteAnswers
	drops          int                              // answers still to lose, see DropAnswers
	noOAuthMeta    bool                             // see SetMetadata
	noOIDCMeta     bool
	noRevocation   bool          // see SetRevocation
	deviceInterval time.Duration // see SetDeviceInterval

	// State. Tokens and codes are never deleted, so a value is never
	// issued twice.
	clients  map[string]string // client id → secret ("" for a public client)
	refresh  map[string]*refreshToken
	access   map[string]*accessToken
	consents map[string]*authRequest // consent pages shown, by their form's request id
	codes    map[string]*authCode
	devices  map[string]*deviceGrant // by device_code
	userCode map[string]*deviceGrant // by normalized user_code

	// Counts.
	calls       []Call
	reuses      int
	meta        int // discovery document requests, see MetadataCalls
	revocations []Revocation
	finished    int           // calls whose outcome is recorded
	changed     chan struct{} // closed and replaced whenever finished grows
}

// family is one grant: every token descended from one interactive login.
type family struct {
	clientID   string
	newest     string // the newest refresh token
	revoked    bool
	revokedWhy string // error_description for later use of the family
}

type refreshToken struct {
	fam        *family
	redeemedAt time.Time   // zero until redeemed with rotation on
	answer     tokenAnswer // what the redemption answered, repeated within a reuse interval
}

type accessToken struct {
	clientID string
	fam      *family   // nil for client_credentials
	expires  time.Time // zero: does not expire
	revoked  bool      // revoked by itself at the revocation endpoint
}

// Start starts a server on addr, a loopback address such as
// "127.0.0.1:0" (a random port) or "localhost:9096", serving plain HTTP.
// Its issuer is BaseURL. An address other machines could reach is refused
// with ErrNotLoopback: the consent page approves whoever asks. Defaults:
// refresh-token rotation on, a reuse answered as ReuseInvalidGrant, no
// reuse interval, no latency, expires_in 3600, token_type "Bearer", both
// discovery documents, a revocation endpoint, a device polling interval of
// 5 s. No clients are known until AddClient.
func Start(addr string) (*Server, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("authserver: listen address %q: %w; give host:port such as 127.0.0.1:9096", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("%w: %q; listen on 127.0.0.1, ::1 or localhost: whoever reaches the consent page can approve a login", ErrNotLoopback, addr)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("authserver: listen on %s: %w", addr, err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	s := &Server{
		base:           "http://" + l.Addr().String(),
		closing:        make(chan struct{}),
		rotation:       true,
		reuse:          ReuseInvalidGrant,
		expiresIn:      3600,
		tokenType:      "Bearer",
		now:            time.Now,
		deviceInterval: 5 * time.Second,
		clients:        make(map[string]string),
		refresh:        make(map[string]*refreshToken),
		access:         make(map[string]*accessToken),
		consents:       make(map[string]*authRequest),
		codes:          make(map[string]*authCode),
		devices:        make(map[string]*deviceGrant),
		userCode:       make(map[string]*deviceGrant),
		changed:        make(chan struct{}),
	}
	s.hosts = map[string]bool{l.Addr().String(): true, fmt.Sprintf("localhost:%d", port): true}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	s.client = &http.Client{Transport: tr}

	mux := http.NewServeMux()
	mux.HandleFunc("/token", s.handleToken)
	mux.HandleFunc("GET "+MetadataPath, s.handleMetadata)
	mux.HandleFunc("GET "+OpenIDConfigurationPath, s.handleMetadata)
	mux.HandleFunc("POST "+DeviceAuthorizationPath, s.handleDeviceAuthorization)
	mux.HandleFunc(RevocationPath, s.handleRevocation)
	// The pages a person sees answer only to this server's own name.
	mux.HandleFunc("GET "+AuthorizePath, s.ownHost(s.handleAuthorize))
	mux.HandleFunc("POST "+AuthorizePath, s.ownHost(s.handleConsent))
	mux.HandleFunc("GET "+DevicePath, s.ownHost(s.handleDevicePage))
	mux.HandleFunc("POST "+DevicePath, s.ownHost(s.handleDeviceDecision))
	mux.HandleFunc("GET /{$}", s.ownHost(s.handleHome))
	s.http = &http.Server{Handler: s.track(mux), ReadHeaderTimeout: 10 * time.Second}
	s.served.Go(func() { _ = s.http.Serve(l) })
	return s, nil
}

// track counts the handlers in flight, so Close can wait for them.
func (s *Server) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.entry.RLock()
		if s.stopping {
			s.entry.RUnlock()
			http.Error(w, "authserver: shutting down", http.StatusServiceUnavailable)
			return
		}
		s.handlers.Add(1)
		s.entry.RUnlock()
		defer s.handlers.Done()
		h.ServeHTTP(w, r)
	})
}

// ownHost answers only requests addressed to this server by name: a web
// page that rebinds its own DNS name to 127.0.0.1 reaches the listener, but
// with its own name in the Host header, and must not read or submit the
// consent and verification pages. The token, revocation and metadata
// endpoints need no such check (they take client credentials, or give
// nothing away), and a reverse proxy in front of them may keep its own
// Host.
func (s *Server) ownHost(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.hosts[r.Host] {
			http.Error(w, "authserver: unknown host "+r.Host+"; use "+s.base, http.StatusMisdirectedRequest)
			return
		}
		h(w, r)
	}
}

// Close stops the server: it ends latency waits, closes every connection
// (a call in flight sees its client gone) and waits for the handlers to
// return, so an OnToken hook must return too. It closes the idle
// connections of Client. Calling it again does nothing.
func (s *Server) Close() {
	s.closed.Do(func() {
		close(s.closing)
		s.entry.Lock()
		s.stopping = true
		s.entry.Unlock()
		_ = s.http.Close()
		s.served.Wait()
		s.handlers.Wait()
		s.client.CloseIdleConnections()
	})
}

// BaseURL is the server's base URL (http://127.0.0.1:port), also its issuer
// in the discovery metadata.
func (s *Server) BaseURL() string { return s.base }

// TokenURL is the token endpoint, BaseURL + "/token".
func (s *Server) TokenURL() string { return s.base + TokenPath }

// Client returns an HTTP client for this server whose idle connections are
// closed by Close, so tests that use it leak no goroutines.
func (s *Server) Client() *http.Client { return s.client }

// AddClient registers a client, or replaces the secret of a known one. A
// confidential client authenticates with HTTP Basic (RFC 6749 §2.3.1:
// form-url-encoded id and secret) or with client_id and client_secret in the
// form; a public client (secret "") sends only client_id. Every client may
// use every grant the server has (client_credentials confidential clients
// only) and any loopback redirect URI (RFC 8252 §7.3).
func (s *Server) AddClient(id, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[id] = secret
}

// Issue creates a new grant (token family) for a known client, as an
// interactive login would, and returns its tokens: a fresh access token, a
// fresh refresh token, the current token type and expires_in. It is not a
// token-endpoint call and is not counted. An unknown client is
// ErrUnknownClient.
func (s *Server) Issue(clientID string) (Tokens, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.clients[clientID]; !ok {
		return Tokens{}, fmt.Errorf("%w %q; call AddClient first", ErrUnknownClient, clientID)
	}
	ans := s.newGrantLocked(clientID, "")
	return Tokens{AccessToken: ans.AccessToken, RefreshToken: ans.RefreshToken, TokenType: ans.TokenType, ExpiresIn: ans.ExpiresIn}, nil
}

// newGrantLocked starts a token family for client, as a completed login
// does, and returns the token answer that hands it out.
func (s *Server) newGrantLocked(clientID, scope string) tokenAnswer {
	fam := &family{clientID: clientID}
	return tokenAnswer{
		AccessToken:  s.newAccessLocked(clientID, fam),
		RefreshToken: s.newRefreshLocked(fam),
		TokenType:    s.tokenType,
		ExpiresIn:    s.expiresIn,
		Scope:        scope,
	}
}

// SetReuse sets how a reused refresh token is answered.
func (s *Server) SetReuse(m ReuseMode) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reuse = m
}

// SetReuseInterval sets a grace interval: a redeemed refresh token presented
// again no later than d after its first redemption gets the same answer as
// that redemption (the same new tokens), as with Dex's reuseInterval or
// Okta's grace period, unless its family was revoked since. Such a call still
// counts as a reuse. 0, the default, means no grace.
func (s *Server) SetReuseInterval(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reuseInterval = d
}

// SetRotation turns refresh-token rotation on (the default) or off. With
// rotation off a refresh token stays valid after use and answers carry no
// refresh_token, so the client must keep the old one (RFC 6749 §6).
func (s *Server) SetRotation(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rotation = on
}

// SetLatency makes every token call wait d after it arrives, before anything
// else happens. A call whose client goes away during the wait is abandoned
// unprocessed: a refresh token it carried is not redeemed.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// SetExpiresIn sets the expires_in of new access tokens, in seconds; 0 omits
// expires_in from answers, and such access tokens do not expire.
func (s *Server) SetExpiresIn(sec int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expiresIn = sec
}

// SetTokenType sets the token_type of answers, e.g. "bearer" as Dex writes
// it.
func (s *Server) SetTokenType(tt string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenType = tt
}

// SetClock replaces the server's clock (time.Now by default; nil restores
// it). It decides Call.At, access-token expiry, reuse intervals and the
// lifetimes of authorization and device codes, so tests can step over them
// without waiting. Latency uses real time.
func (s *Server) SetClock(now func() time.Time) {
	if now == nil {
		now = time.Now
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now = now
}

// Fail queues the same failure for the next n token calls, after any already
// queued. A failed call gets status, header and body as given (Content-Type
// application/json when body is valid JSON and header sets none) after the
// latency, before client authentication and before anything is redeemed, as a
// proxy or an overloaded server would answer. For example
// Fail(3, 503, "", nil), or Fail(1, 429, `{"error":"rate_limited"}`,
// http.Header{"Retry-After": {"2"}}).
func (s *Server) Fail(n int, status int, body string, header http.Header) {
	rep := failReply(status, body, header)
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.fails = append(s.fails, rep)
	}
}

// FailClient answers every token call that claims to be clientID with the
// given failure (as Fail describes it) until it is called again for that
// client with status 0, as a proxy or rate limiter in front of the server
// that refuses one client only would. Queued Fail answers come first. It
// is safe for concurrent use.
func (s *Server) FailClient(clientID string, status int, body string, header http.Header) {
	var rep reply
	if status != 0 {
		rep = failReply(status, body, header)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if status == 0 {
		delete(s.clientFails, clientID)
		return
	}
	if s.clientFails == nil {
		s.clientFails = map[string]reply{}
	}
	s.clientFails[clientID] = rep
}

// RewriteAnswers makes the server pass every successful token answer (200,
// after the grant was processed: a refresh token is redeemed) through f
// before it is written, as a broken or hostile server would answer: f may
// change, add or delete members, each a raw JSON value. nil removes it. f
// runs on the server's goroutine of the call. It is safe for concurrent
// use.
func (s *Server) RewriteAnswers(f func(answer map[string]json.RawMessage)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rewrite = f
}

// DropAnswers loses the answers of the next n token calls that are not
// answered by Fail: each is processed in full (a refresh token is redeemed)
// and then its connection is closed instead of the answer being written, as
// when an answer is lost on the way back. The client sees a transport error
// and holds a refresh token that is already spent.
func (s *Server) DropAnswers(n int) {
	if n <= 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drops += n
}

// SetDown takes the token endpoint down or brings it back. While down, every
// token call has its TCP connection closed without an answer, as by a crashed
// server; the call is still counted. The other endpoints stay up.
func (s *Server) SetDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
}

// Revoke revokes the token family of a refresh token (an access token of the
// family works too): later use of any of its refresh tokens gets 400
// invalid_grant "token revoked", and its access tokens are no longer valid.
// A token this server did not issue to a login is ErrUnknownToken.
func (s *Server) Revoke(token string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	fam := s.familyLocked(token)
	if fam == nil {
		return fmt.Errorf("%w %q: Revoke takes a refresh token or an access token of a login", ErrUnknownToken, token)
	}
	s.revokeLocked(fam, "token revoked")
	return nil
}

// OnToken sets a hook run inside every token call that passes client
// authentication, before the grant is processed and answered; nil removes it.
// Tests use it to block a call in flight or to change state mid-call. It runs
// on the server's goroutine for that call, concurrently with other calls, and
// must return for the server to close.
func (s *Server) OnToken(f func(r *http.Request)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onToken = f
}

// OnCall sets a function run with the record of every token call once its
// outcome is recorded, before the answer is written; nil removes it. The
// development server logs calls with it. It runs on the server's goroutine
// for that call, concurrently with other calls.
func (s *Server) OnCall(f func(Call)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onCall = f
}

// Calls returns how many token-endpoint calls have arrived, whatever their
// method, grant or outcome, including calls in progress, failed by Fail and
// dropped by SetDown.
func (s *Server) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

// Reuses returns how many times a refresh token was presented after it had
// already been redeemed (with rotation on), whatever the answer, grace
// answers included.
func (s *Server) Reuses() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reuses
}

// CallLog returns a copy of the record of every token call, in arrival order.
func (s *Server) CallLog() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	log := make([]Call, len(s.calls))
	for i, c := range s.calls {
		c.Form = cloneValues(c.Form)
		log[i] = c
	}
	return log
}

// WaitCalls waits until at least n token calls have their outcome recorded
// (answered, failed, dropped or abandoned), or ctx is done. It lets tests wait
// for the server instead of sleeping.
func (s *Server) WaitCalls(ctx context.Context, n int) error {
	for {
		s.mu.Lock()
		done, changed := s.finished >= n, s.changed
		s.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// ValidAccessToken reports whether tok is an access token this server issued
// that has not expired and is not revoked, by itself or with its family, as
// a resource server would check it.
func (s *Server) ValidAccessToken(tok string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.access[tok]
	if !ok || at.revoked || at.fam != nil && at.fam.revoked {
		return false
	}
	return at.expires.IsZero() || s.now().Before(at.expires)
}

// CurrentRefreshToken returns the newest refresh token of the family that the
// given access or refresh token belongs to, or "" for an unknown token or a
// client_credentials access token.
func (s *Server) CurrentRefreshToken(accessOrRefresh string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if fam := s.familyLocked(accessOrRefresh); fam != nil {
		return fam.newest
	}
	return ""
}

func (s *Server) familyLocked(tok string) *family {
	if rt, ok := s.refresh[tok]; ok {
		return rt.fam
	}
	if at, ok := s.access[tok]; ok {
		return at.fam
	}
	return nil
}

func (s *Server) revokeLocked(fam *family, why string) {
	if !fam.revoked {
		fam.revoked, fam.revokedWhy = true, why
	}
}

// randomValue returns prefix followed by 24 random hex characters: 96 bits,
// unguessable, so codes and tokens need no other protection.
func randomValue(prefix string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// newTokenLocked returns a random opaque token value never issued before.
func (s *Server) newTokenLocked(prefix string) string {
	for {
		v := randomValue(prefix)
		_, isRefresh := s.refresh[v]
		_, isAccess := s.access[v]
		if !isRefresh && !isAccess {
			return v
		}
	}
}

func (s *Server) newAccessLocked(clientID string, fam *family) string {
	v := s.newTokenLocked("at-")
	at := &accessToken{clientID: clientID, fam: fam}
	if s.expiresIn > 0 {
		at.expires = s.now().Add(time.Duration(s.expiresIn) * time.Second)
	}
	s.access[v] = at
	return v
}

func (s *Server) newRefreshLocked(fam *family) string {
	v := s.newTokenLocked("rt-")
	s.refresh[v] = &refreshToken{fam: fam}
	fam.newest = v
	return v
}

func cloneValues(v url.Values) url.Values {
	if v == nil {
		return nil
	}
	c := make(url.Values, len(v))
	for k, vv := range v {
		c[k] = append([]string(nil), vv...)
	}
	return c
}
