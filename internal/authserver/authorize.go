package authserver

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"time"
)

// Lifetimes of the authorization code flow's one-time values.
const (
	// consentLifetime bounds how long a consent page may be answered.
	consentLifetime = 10 * time.Minute
	// codeLifetime is an authorization code's; RFC 6749 §4.1.2 recommends
	// at most 10 minutes, real servers use about one.
	codeLifetime = time.Minute
)

// authRequest is an authorization request whose consent page was shown and
// not yet answered.
type authRequest struct {
	clientID, redirectURI, state, challenge, scope string
	expires                                        time.Time
}

// authCode is an authorization code handed out on approval.
type authCode struct {
	clientID, redirectURI, challenge, scope string
	expires                                 time.Time
	used                                    bool
	fam                                     *family // the grant it was redeemed for
}

// pkceVerifier is the form of a code_verifier (RFC 7636 §4.1), and
// s256Challenge that of its S256 code_challenge: base64url of 32 bytes.
var (
	pkceVerifier  = regexp.MustCompile(`^[A-Za-z0-9._~-]{43,128}$`)
	s256Challenge = regexp.MustCompile(`^[A-Za-z0-9_-]{43}$`)
)

// handleAuthorize is the authorization endpoint (RFC 6749 §4.1.1): it
// checks the request and shows the consent page. A request whose client or
// redirect URI is wrong gets an error page, never a redirect (§4.1.2.1: the
// redirect URI cannot be trusted); other errors go back to the client's
// redirect URI.
func (s *Server) handleAuthorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	clientID, redirect := q.Get("client_id"), q.Get("redirect_uri")
	s.mu.Lock()
	_, known := s.clients[clientID]
	s.mu.Unlock()
	if !known {
		writePage(w, http.StatusBadRequest, page{Title: "Unknown client", Text: []string{"The client " + clientID + " is not known here: check the client id the application was given."}})
		return
	}
	if problem := redirectProblem(redirect); problem != "" {
		writePage(w, http.StatusBadRequest, page{Title: "Invalid redirect URI", Text: []string{"redirect_uri " + redirect + " " + problem + "."}})
		return
	}
	state := q.Get("state")
	switch {
	case q.Get("response_type") != "code":
		redirectError(w, r, redirect, state, "unsupported_response_type", "response_type must be code", s.base)
		return
	case q.Get("code_challenge") == "":
		redirectError(w, r, redirect, state, "invalid_request", "code_challenge is required: PKCE (RFC 7636) with method S256", s.base)
		return
	case q.Get("code_challenge_method") != "S256":
		redirectError(w, r, redirect, state, "invalid_request", "code_challenge_method must be S256; plain is not accepted", s.base)
		return
	case !s256Challenge.MatchString(q.Get("code_challenge")):
		redirectError(w, r, redirect, state, "invalid_request", "code_challenge is not the base64url of a SHA-256 hash", s.base)
		return
	}

	s.mu.Lock()
	id := randomValue("req-")
	s.consents[id] = &authRequest{
		clientID: clientID, redirectURI: redirect, state: state,
		challenge: q.Get("code_challenge"), scope: q.Get("scope"),
		expires: s.now().Add(consentLifetime),
	}
	s.mu.Unlock()
	text := []string{"The application " + clientID + " asks to act on your behalf and to keep doing so (a refresh token)."}
	if sc := q.Get("scope"); sc != "" {
		text = append(text, "Scope: "+sc+".")
	}
	u, _ := url.Parse(redirect)
	text = append(text, "Approving sends you back to it on "+u.Host+".")
	writePage(w, http.StatusOK, page{
		Title: "Authorize " + clientID + "?",
		Text:  text,
		Form:  &form{Method: "post", Action: AuthorizePath, Hidden: map[string]string{"request": id}, Buttons: decisionButtons},
	})
}

// handleConsent takes the consent page's answer and redirects back to the
// client with a code, or with access_denied.
func (s *Server) handleConsent(w http.ResponseWriter, r *http.Request) {
	r.ParseForm()
	id, decision := r.PostForm.Get("request"), r.PostForm.Get("decision")
	s.mu.Lock()
	req, ok := s.consents[id]
	// One answer per page: a replayed form finds nothing.
	delete(s.consents, id)
	now := s.now()
	s.mu.Unlock()
	if !ok || !now.Before(req.expires) {
		writePage(w, http.StatusBadRequest, page{Title: "Login request expired", Text: []string{"This login request is unknown, expired or already answered: start the login again in the application."}})
		return
	}
	if decision != "approve" {
		redirectError(w, r, req.redirectURI, req.state, "access_denied", "the user denied the request", s.base)
		return
	}
	s.mu.Lock()
	code := randomValue("code-")
	s.codes[code] = &authCode{
		clientID: req.clientID, redirectURI: req.redirectURI, challenge: req.challenge,
		scope: req.scope, expires: now.Add(codeLifetime),
	}
	s.mu.Unlock()
	redirectTo(w, r, req.redirectURI, url.Values{"code": {code}}, req.state, s.base)
}

// redirectProblem says what is wrong with a redirect URI, "" when nothing:
// it must be a loopback http URI, with any port (RFC 8252 §7.3), as native
// applications and command-line tools register.
func redirectProblem(s string) string {
	u, err := url.Parse(s)
	switch {
	case s == "":
		return "is missing; send the loopback URI the application listens on"
	case err != nil || u.Scheme != "http" || u.Host == "":
		return "is not an absolute http URI"
	case u.Fragment != "" || u.User != nil:
		return "has a fragment or user information"
	}
	if h := u.Hostname(); h != "localhost" {
		if ip := net.ParseIP(h); ip == nil || !ip.IsLoopback() {
			return "is not on a loopback address; this server redirects only to 127.0.0.1, [::1] or localhost (RFC 8252 §7.3)"
		}
	}
	return ""
}

// redirectTo sends the browser back to the client's redirect URI with
// params, the state and the issuer (RFC 9207, so a client talking to
// several servers knows which one answered). 303: the browser follows a
// form's POST with a GET.
func redirectTo(w http.ResponseWriter, r *http.Request, redirect string, params url.Values, state, issuer string) {
	u, _ := url.Parse(redirect) // checked by redirectProblem
	q := u.Query()
	for k, v := range params {
		q[k] = v
	}
	if state != "" {
		q.Set("state", state)
	}
	q.Set("iss", issuer)
	u.RawQuery = q.Encode()
	http.Redirect(w, r, u.String(), http.StatusSeeOther)
}

// redirectError sends an authorization error back to the client (RFC 6749
// §4.1.2.1).
func redirectError(w http.ResponseWriter, r *http.Request, redirect, state, code, description, issuer string) {
	redirectTo(w, r, redirect, url.Values{"error": {code}, "error_description": {description}}, state, issuer)
}

// authorizationCodeGrant redeems an authorization code (RFC 6749 §4.1.3)
// after checking its PKCE verifier (RFC 7636 §4.6).
func (s *Server) authorizationCodeGrant(client string, form url.Values) reply {
	code := form.Get("code")
	if code == "" {
		return oauthError(http.StatusBadRequest, "invalid_request", "code is missing")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.codes[code]
	verifier := form.Get("code_verifier")
	switch {
	case !ok:
		return oauthError(http.StatusBadRequest, "invalid_grant", "unknown authorization code")
	case c.clientID != client:
		return oauthError(http.StatusBadRequest, "invalid_grant", "authorization code was issued to another client")
	case c.used:
		// RFC 6749 §4.1.2: a code presented twice may have been stolen;
		// what was issued for it is revoked.
		if c.fam != nil {
			s.revokeLocked(c.fam, "grant revoked: its authorization code was used twice")
		}
		return oauthError(http.StatusBadRequest, "invalid_grant", "authorization code already used; the tokens issued for it are revoked")
	case !s.now().Before(c.expires):
		return oauthError(http.StatusBadRequest, "invalid_grant", "authorization code expired")
	case form.Get("redirect_uri") != c.redirectURI:
		return oauthError(http.StatusBadRequest, "invalid_grant", "redirect_uri differs from the one of the authorization request")
	case !pkceVerifier.MatchString(verifier):
		return oauthError(http.StatusBadRequest, "invalid_grant", "code_verifier is missing or malformed (RFC 7636 §4.1)")
	case subtle.ConstantTimeCompare([]byte(s256(verifier)), []byte(c.challenge)) != 1:
		return oauthError(http.StatusBadRequest, "invalid_grant", "code_verifier does not match the code_challenge")
	}
	c.used = true
	ans := s.newGrantLocked(client, c.scope)
	c.fam = s.refresh[ans.RefreshToken].fam
	return jsonReply(http.StatusOK, ans)
}

// s256 is the S256 code challenge of a verifier (RFC 7636 §4.2).
func s256(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}
