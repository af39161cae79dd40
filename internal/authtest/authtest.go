// Package authtest is a test OAuth 2.0 authorization server that answers a
// refresh the way real ones do (Dex, node oidc-provider, Auth0, Okta, Ory
// Hydra, AWS Cognito): refresh-token rotation or none, the different answers
// to a spent refresh token being presented again, reuse grace intervals,
// revocation of a whole token family, answers without refresh_token or
// expires_in, latency, queued 5xx/429 failures, failures for one client
// only, rewritten (hostile) answers, lost answers and a crashed server.
//
// Every integration test of the refresher talks to one of these servers over
// real HTTP and then asserts on what it counted: how many token calls arrived
// (Calls), how many presented a refresh token that was already redeemed
// (Reuses), and what each call carried and got (CallLog). The counts are exact
// under any concurrency: every token call is recorded when it arrives and its
// outcome is recorded before the answer is written, so a client that has its
// answer always finds it in the log.
//
// All methods of Server are safe for concurrent use.
package authtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
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

// Server is a running test authorization server. Create it with New; its
// settings may be changed at any time, also while calls are in progress, and
// apply to calls that arrive afterwards. It is safe for concurrent use.
type Server struct {
	t       testing.TB
	srv     *httptest.Server
	closing chan struct{} // closed when the test ends, to end latency waits

	mu sync.Mutex

	// Settings.
	rotation      bool
	reuse         ReuseMode
	reuseInterval time.Duration
	latency       time.Duration
	expiresIn     int64
	tokenType     string
	down          bool
	now           func() time.Time
	onToken       func(*http.Request)
	fails         []reply                          // answers queued by Fail, oldest first
	clientFails   map[string]reply                 // see FailClient
	rewrite       func(map[string]json.RawMessage) // see RewriteAnswers
	drops         int                              // answers still to lose, see DropAnswers
	noOAuthMeta   bool                             // see SetMetadata
	noOIDCMeta    bool

	// State. Tokens are never deleted, so a value is never issued twice.
	clients map[string]string // client id → secret ("" for a public client)
	refresh map[string]*refreshToken
	access  map[string]*accessToken

	// Counts.
	calls    []Call
	reuses   int
	meta     int           // discovery document requests, see MetadataCalls
	finished int           // calls whose outcome is recorded
	changed  chan struct{} // closed and replaced whenever finished grows
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
	fam     *family   // nil for client_credentials
	expires time.Time // zero: does not expire
}

// New starts a test authorization server on a random port of 127.0.0.1
// (plain HTTP) and closes it when the test ends. Defaults: refresh-token
// rotation on, a reuse answered as ReuseInvalidGrant, no reuse interval, no
// latency, expires_in 3600, token_type "Bearer". No clients are known until
// AddClient.
func New(t testing.TB) *Server {
	t.Helper()
	s := &Server{
		t:         t,
		closing:   make(chan struct{}),
		rotation:  true,
		reuse:     ReuseInvalidGrant,
		expiresIn: 3600,
		tokenType: "Bearer",
		now:       time.Now,
		clients:   make(map[string]string),
		refresh:   make(map[string]*refreshToken),
		access:    make(map[string]*accessToken),
		changed:   make(chan struct{}),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/token", s.handleToken)
	mux.HandleFunc("GET "+MetadataPath, s.handleMetadata)
	mux.HandleFunc("GET "+OpenIDConfigurationPath, s.handleMetadata)
	s.srv = httptest.NewServer(mux)
	t.Cleanup(func() {
		close(s.closing)
		// Close waits for in-flight handlers; closing the client connections
		// first cancels their request contexts, so none waits out a latency.
		s.srv.CloseClientConnections()
		s.srv.Close()
	})
	return s
}

// BaseURL is the server's base URL (http://127.0.0.1:port), also its issuer
// in the discovery metadata. It is safe for concurrent use.
func (s *Server) BaseURL() string { return s.srv.URL }

// TokenURL is the token endpoint, BaseURL + "/token". It is safe for
// concurrent use.
func (s *Server) TokenURL() string { return s.srv.URL + "/token" }

// Client returns an HTTP client for this server whose idle connections are
// closed with the server, so tests that use it leak no goroutines. It is safe
// for concurrent use.
func (s *Server) Client() *http.Client { return s.srv.Client() }

// AddClient registers a client, or replaces the secret of a known one. A
// confidential client authenticates with HTTP Basic (RFC 6749 §2.3.1:
// form-url-encoded id and secret) or with client_id and client_secret in the
// form; a public client (secret "") sends only client_id. It is safe for
// concurrent use.
func (s *Server) AddClient(id, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[id] = secret
}

// Issue creates a new grant (token family) for a known client, as an
// interactive login would, and returns its tokens: a fresh access token, a
// fresh refresh token, the current token type and expires_in. It is not a
// token-endpoint call and is not counted. An unknown client fails the test.
// It is safe for concurrent use.
func (s *Server) Issue(clientID string) Tokens {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.clients[clientID]; !ok {
		s.t.Fatalf("authtest: Issue for unknown client %q; call AddClient first", clientID)
	}
	fam := &family{clientID: clientID}
	return Tokens{
		AccessToken:  s.newAccessLocked(fam),
		RefreshToken: s.newRefreshLocked(fam),
		TokenType:    s.tokenType,
		ExpiresIn:    s.expiresIn,
	}
}

// SetReuse sets how a reused refresh token is answered. It is safe for
// concurrent use.
func (s *Server) SetReuse(m ReuseMode) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reuse = m
}

// SetReuseInterval sets a grace interval: a redeemed refresh token presented
// again no later than d after its first redemption gets the same answer as
// that redemption (the same new tokens), as with Dex's reuseInterval or
// Okta's grace period, unless its family was revoked since. Such a call still
// counts as a reuse. 0, the default, means no grace. It is safe for
// concurrent use.
func (s *Server) SetReuseInterval(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reuseInterval = d
}

// SetRotation turns refresh-token rotation on (the default) or off. With
// rotation off a refresh token stays valid after use and answers carry no
// refresh_token, so the client must keep the old one (RFC 6749 §6). It is
// safe for concurrent use.
func (s *Server) SetRotation(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rotation = on
}

// SetLatency makes every token call wait d after it arrives, before anything
// else happens. A call whose client goes away during the wait is abandoned
// unprocessed: a refresh token it carried is not redeemed. It is safe for
// concurrent use.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// SetExpiresIn sets the expires_in of new access tokens, in seconds; 0 omits
// expires_in from answers, and such access tokens do not expire. It is safe
// for concurrent use.
func (s *Server) SetExpiresIn(sec int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expiresIn = sec
}

// SetTokenType sets the token_type of answers, e.g. "bearer" as Dex writes
// it. It is safe for concurrent use.
func (s *Server) SetTokenType(tt string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenType = tt
}

// SetClock replaces the server's clock (time.Now by default; nil restores
// it). It decides Call.At, access-token expiry and reuse intervals, so tests
// can step over them without waiting. Latency uses real time. It is safe for
// concurrent use.
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
// http.Header{"Retry-After": {"2"}}). It is safe for concurrent use.
func (s *Server) Fail(n int, status int, body string, header http.Header) {
	rep := failure(status, body, header)
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.fails = append(s.fails, rep)
	}
}

// failure is the answer Fail and FailClient give.
func failure(status int, body string, header http.Header) reply {
	rep := reply{status: status, header: header.Clone(), body: []byte(body)}
	if rep.header == nil {
		rep.header = http.Header{}
	}
	if body != "" && rep.header.Get("Content-Type") == "" {
		if json.Valid(rep.body) {
			rep.header.Set("Content-Type", "application/json")
		} else {
			rep.header.Set("Content-Type", "text/plain; charset=utf-8")
		}
	}
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(rep.body, &e) == nil {
		rep.errCode = e.Error
	}
	return rep
}

// FailClient answers every token call that claims to be clientID with the
// given failure (as Fail describes it) until it is called again for that
// client with status 0, as a proxy or rate limiter in front of the server
// that refuses one client only would. Queued Fail answers come first. It
// is safe for concurrent use.
func (s *Server) FailClient(clientID string, status int, body string, header http.Header) {
	var rep reply
	if status != 0 {
		rep = failure(status, body, header)
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
// and holds a refresh token that is already spent. It is safe for concurrent
// use.
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
// server; the call is still counted. Discovery metadata stays up. It is safe
// for concurrent use.
func (s *Server) SetDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
}

// Revoke revokes the token family of a refresh token (an access token of the
// family works too): later use of any of its refresh tokens gets 400
// invalid_grant "token revoked", and its access tokens are no longer valid.
// An unknown token fails the test. It is safe for concurrent use.
func (s *Server) Revoke(refreshToken string) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	fam := s.familyLocked(refreshToken)
	if fam == nil {
		s.t.Errorf("authtest: Revoke of unknown token %q", refreshToken)
		return
	}
	s.revokeLocked(fam, "token revoked")
}

// OnToken sets a hook run inside every token call that passes client
// authentication, before the grant is processed and answered; nil removes it.
// Tests use it to block a call in flight or to change state mid-call. It runs
// on the server's goroutine for that call, concurrently with other calls, and
// must return for the server to close. It is safe for concurrent use.
func (s *Server) OnToken(f func(r *http.Request)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onToken = f
}

// Calls returns how many token-endpoint calls have arrived, whatever their
// method, grant or outcome, including calls in progress, failed by Fail and
// dropped by SetDown. It is safe for concurrent use.
func (s *Server) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

// Reuses returns how many times a refresh token was presented after it had
// already been redeemed (with rotation on), whatever the answer, grace
// answers included. It is safe for concurrent use.
func (s *Server) Reuses() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reuses
}

// CallLog returns a copy of the record of every token call, in arrival order.
// It is safe for concurrent use.
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
// for the server instead of sleeping. It is safe for concurrent use.
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
// that has not expired and whose family is not revoked, as a resource server
// would check it. It is safe for concurrent use.
func (s *Server) ValidAccessToken(tok string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.access[tok]
	if !ok || at.fam != nil && at.fam.revoked {
		return false
	}
	return at.expires.IsZero() || s.now().Before(at.expires)
}

// CurrentRefreshToken returns the newest refresh token of the family that the
// given access or refresh token belongs to, or "" for an unknown token or a
// client_credentials access token. It is safe for concurrent use.
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

// newTokenLocked returns a random opaque token value never issued before.
func (s *Server) newTokenLocked(prefix string) string {
	for {
		b := make([]byte, 12)
		rand.Read(b)
		v := prefix + hex.EncodeToString(b)
		_, isRefresh := s.refresh[v]
		_, isAccess := s.access[v]
		if !isRefresh && !isAccess {
			return v
		}
	}
}

func (s *Server) newAccessLocked(fam *family) string {
	v := s.newTokenLocked("at-")
	at := &accessToken{fam: fam}
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

func (s *Server) handleMetadata(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.meta++
	off := r.URL.Path == MetadataPath && s.noOAuthMeta || r.URL.Path == OpenIDConfigurationPath && s.noOIDCMeta
	s.mu.Unlock()
	if off {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"issuer":                                s.BaseURL(),
		"token_endpoint":                        s.TokenURL(),
		"token_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post"},
		"grant_types_supported":                 []string{"refresh_token", "client_credentials"},
		"response_types_supported":              []string{"code"},
	})
}
