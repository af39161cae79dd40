package authserver

import (
	"encoding/json"
	"net/http"
	"net/url"
	"time"
)

// reply is one answer of the token endpoint, decided before it is written so
// that the call log holds it before the client can see it.
type reply struct {
	status  int
	header  http.Header
	body    []byte
	errCode string
	reuse   bool
}

// tokenAnswer is a successful token response (RFC 6749 §5.1).
type tokenAnswer struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in,omitempty"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope,omitempty"`
}

func jsonReply(status int, v any) reply {
	body, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own answer types are marshalled
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	// RFC 6749 §5.1: token answers must not be cached.
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	return reply{status: status, header: h, body: body}
}

// failReply is an answer queued by Fail.
func failReply(status int, body string, header http.Header) reply {
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

// oauthError is an error answer (RFC 6749 §5.2).
func oauthError(status int, code, description string) reply {
	rep := jsonReply(status, map[string]string{"error": code, "error_description": description})
	rep.errCode = code
	return rep
}

// handleToken is the token endpoint. In order: the call is recorded; a down
// server hangs up; the latency passes; a queued failure is answered; then
// method, client authentication, the OnToken hook and the grant.
func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	r.ParseForm() // a malformed body leaves the form empty: invalid_request below
	form := r.PostForm
	if r.Method != http.MethodPost {
		form = r.Form
	}

	s.mu.Lock()
	idx := len(s.calls)
	s.calls = append(s.calls, Call{
		At:           s.now(),
		GrantType:    form.Get("grant_type"),
		ClientID:     claimedClient(r, form),
		RefreshToken: form.Get("refresh_token"),
		Form:         cloneValues(form),
	})
	down, latency := s.down, s.latency
	var fail *reply
	drop := false
	switch {
	case down:
	case len(s.fails) > 0:
		f := s.fails[0]
		s.fails, fail = s.fails[1:], &f
	case s.clientFails[claimedClient(r, form)].status != 0:
		f := s.clientFails[claimedClient(r, form)]
		fail = &f
	case s.drops > 0:
		s.drops--
		drop = true
	}
	s.mu.Unlock()

	if down {
		s.finish(idx, reply{}, true)
		hangUp(w)
		return
	}
	if latency > 0 {
		timer := time.NewTimer(latency)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-r.Context().Done():
			s.finish(idx, reply{}, true)
			return
		case <-s.closing:
			s.finish(idx, reply{}, true)
			return
		}
	}
	if fail != nil {
		s.deliver(w, r, idx, *fail, false)
		return
	}
	s.deliver(w, r, idx, s.rewritten(s.serveToken(r)), drop)
}

// rewritten passes a successful answer through the RewriteAnswers hook.
func (s *Server) rewritten(rep reply) reply {
	s.mu.Lock()
	f := s.rewrite
	s.mu.Unlock()
	if f == nil || rep.status != http.StatusOK {
		return rep
	}
	var answer map[string]json.RawMessage
	if err := json.Unmarshal(rep.body, &answer); err != nil {
		panic(err) // only our own answers are rewritten
	}
	f(answer)
	body, err := json.Marshal(answer)
	if err != nil {
		panic(err)
	}
	rep.body = body
	return rep
}

// claimedClient is the client a call says it is, before authentication.
func claimedClient(r *http.Request, form url.Values) string {
	if user, _, ok := r.BasicAuth(); ok {
		if id, err := url.QueryUnescape(user); err == nil {
			return id
		}
		return user
	}
	return form.Get("client_id")
}

// deliver records the outcome of call idx and then writes rep, or closes the
// connection when the answer is to be lost. Recording first means a client
// that has its answer finds it in the call log.
func (s *Server) deliver(w http.ResponseWriter, r *http.Request, idx int, rep reply, drop bool) {
	if drop || r.Context().Err() != nil {
		s.finish(idx, rep, true)
		if drop {
			hangUp(w)
		}
		return
	}
	s.finish(idx, rep, false)
	for k, v := range rep.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rep.status)
	w.Write(rep.body)
}

func (s *Server) finish(idx int, rep reply, dropped bool) {
	s.mu.Lock()
	c := &s.calls[idx]
	c.Status, c.Error, c.Reuse, c.Dropped = rep.status, rep.errCode, rep.reuse, dropped
	s.finished++
	close(s.changed)
	s.changed = make(chan struct{})
	hook, done := s.onCall, *c
	s.mu.Unlock()
	if hook != nil {
		done.Form = cloneValues(done.Form)
		hook(done)
	}
}

// hangUp closes the connection without an answer, as a crashed server would.
func hangUp(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// Not hijackable (HTTP/2): aborting the handler resets the stream.
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}

func (s *Server) serveToken(r *http.Request) reply {
	if r.Method != http.MethodPost {
		rep := oauthError(http.StatusMethodNotAllowed, "invalid_request", "the token endpoint accepts POST only")
		rep.header.Set("Allow", http.MethodPost)
		return rep
	}
	form := r.PostForm
	client, rep, ok := s.authenticate(r)
	if !ok {
		return rep
	}

	s.mu.Lock()
	hook := s.onToken
	s.mu.Unlock()
	if hook != nil {
		hook(r)
	}

	switch gt := form.Get("grant_type"); gt {
	case "":
		return oauthError(http.StatusBadRequest, "invalid_request", "grant_type is missing")
	case "refresh_token":
		return s.refreshGrant(client, form)
	case "client_credentials":
		return s.clientCredentialsGrant(client, form)
	case "authorization_code":
		return s.authorizationCodeGrant(client, form)
	case DeviceCodeGrant:
		return s.deviceCodeGrant(client, form)
	default:
		return oauthError(http.StatusBadRequest, "unsupported_grant_type", "grant_type "+gt+" is not supported")
	}
}

// authenticate checks the client credentials (RFC 6749 §2.3.1) and returns
// the client id, or the answer to give when they do not check out.
func (s *Server) authenticate(r *http.Request) (string, reply, bool) {
	form := r.PostForm
	invalid := func(description string, basic bool) (string, reply, bool) {
		rep := oauthError(http.StatusUnauthorized, "invalid_client", description)
		if basic {
			// RFC 6749 §5.2: a client that tried the Authorization header
			// is told which scheme to use.
			rep.header.Set("WWW-Authenticate", `Basic realm="authserver"`)
		}
		return "", rep, false
	}

	var id, secret string
	user, pass, basic := r.BasicAuth()
	if basic {
		if form.Has("client_secret") {
			return "", oauthError(http.StatusBadRequest, "invalid_request", "more than one client authentication method"), false
		}
		var err1, err2 error
		id, err1 = url.QueryUnescape(user)
		secret, err2 = url.QueryUnescape(pass)
		if err1 != nil || err2 != nil {
			return invalid("client id and secret in HTTP Basic must be form-url-encoded", true)
		}
		if form.Has("client_id") && form.Get("client_id") != id {
			return invalid("client_id in the form differs from the one in HTTP Basic", true)
		}
	} else {
		id, secret = form.Get("client_id"), form.Get("client_secret")
		if id == "" {
			return invalid("client authentication is missing", false)
		}
	}

	s.mu.Lock()
	want, known := s.clients[id]
	s.mu.Unlock()
	if !known || secret != want {
		return invalid("client authentication failed", basic)
	}
	return id, reply{}, true
}

func (s *Server) refreshGrant(client string, form url.Values) reply {
	presented := form.Get("refresh_token")
	if presented == "" {
		return oauthError(http.StatusBadRequest, "invalid_request", "refresh_token is missing")
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	rt, ok := s.refresh[presented]
	switch {
	case !ok:
		return oauthError(http.StatusBadRequest, "invalid_grant", "unknown refresh token")
	case rt.fam.clientID != client:
		// Dex: a refresh token belongs to the client it was issued to; the
		// attempt does not spend it.
		return oauthError(http.StatusBadRequest, "invalid_grant", "refresh token was issued to another client")
	case !rt.redeemedAt.IsZero():
		return s.reuseLocked(rt, now)
	case rt.fam.revoked:
		return oauthError(http.StatusBadRequest, "invalid_grant", rt.fam.revokedWhy)
	}

	ans := tokenAnswer{
		AccessToken: s.newAccessLocked(client, rt.fam),
		TokenType:   s.tokenType,
		ExpiresIn:   s.expiresIn,
		Scope:       form.Get("scope"),
	}
	if s.rotation {
		ans.RefreshToken = s.newRefreshLocked(rt.fam)
		rt.redeemedAt, rt.answer = now, ans
	}
	return jsonReply(http.StatusOK, ans)
}

// reuseLocked answers a refresh token that was already redeemed.
func (s *Server) reuseLocked(rt *refreshToken, now time.Time) reply {
	s.reuses++
	var rep reply
	switch {
	case s.reuseInterval > 0 && !rt.fam.revoked && !now.After(rt.redeemedAt.Add(s.reuseInterval)):
		rep = jsonReply(http.StatusOK, rt.answer)
	case s.reuse == ReuseInvalidGrant403:
		rep = oauthError(http.StatusForbidden, "invalid_grant", "Unknown or invalid refresh token.")
	case s.reuse == ReuseDexInvalidRequest:
		rep = oauthError(http.StatusBadRequest, "invalid_request", "Refresh token is invalid or has already been claimed by another client.")
	case s.reuse == ReuseRevokeFamily:
		s.revokeLocked(rt.fam, "grant revoked: a refresh token was reused")
		rep = oauthError(http.StatusBadRequest, "invalid_grant", "refresh token already used; grant revoked")
	default:
		rep = oauthError(http.StatusBadRequest, "invalid_grant", "refresh token already used")
	}
	rep.reuse = true
	return rep
}

func (s *Server) clientCredentialsGrant(client string, form url.Values) reply {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.clients[client] == "" {
		// RFC 6749 §4.4: only confidential clients may use this grant.
		return oauthError(http.StatusBadRequest, "unauthorized_client", "a public client cannot use client_credentials")
	}
	return jsonReply(http.StatusOK, tokenAnswer{
		AccessToken: s.newAccessLocked(client, nil),
		TokenType:   s.tokenType,
		ExpiresIn:   s.expiresIn,
		Scope:       form.Get("scope"),
	})
}
