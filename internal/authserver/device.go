package authserver

import (
	"crypto/rand"
	"math"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// deviceLifetime is how long a device code and its user code may be used
// (RFC 8628 §3.2 expires_in).
const deviceLifetime = 10 * time.Minute

// userCodeAlphabet has no vowels, so no user code spells a word, and no
// characters that look alike (RFC 8628 §6.1).
const userCodeAlphabet = "BCDFGHJKLMNPQRSTVWXZ"

type deviceState int

const (
	devicePending deviceState = iota
	deviceApproved
	deviceDenied
	deviceRedeemed
)

// deviceGrant is one device authorization request (RFC 8628).
type deviceGrant struct {
	clientID, userCode, scope string
	expires                   time.Time
	interval                  time.Duration // grows by 5 s with each slow_down
	lastPoll                  time.Time
	state                     deviceState
}

// SetDeviceInterval sets the polling interval device authorization answers
// ask for (RFC 8628 §3.2 interval), in whole seconds, at least 1 s; 5 s by
// default. A device that polls faster is told slow_down.
func (s *Server) SetDeviceInterval(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deviceInterval = max(time.Second, d.Round(time.Second))
}

// handleDeviceAuthorization is the device authorization endpoint (RFC 8628
// §3.1). A client that sends credentials must send the right ones; a client
// that sends only its client_id is identified by it, as at Google: the
// token endpoint authenticates a confidential client when it redeems the
// device code.
func (s *Server) handleDeviceAuthorization(w http.ResponseWriter, r *http.Request) {
	r.ParseForm()
	client := r.PostForm.Get("client_id")
	if _, _, basic := r.BasicAuth(); basic || r.PostForm.Has("client_secret") {
		var rep reply
		var ok bool
		if client, rep, ok = s.authenticate(r); !ok {
			writeReply(w, rep)
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, known := s.clients[client]; !known {
		writeReply(w, oauthError(http.StatusUnauthorized, "invalid_client", "unknown client_id"))
		return
	}
	g := &deviceGrant{
		clientID: client,
		userCode: s.newUserCodeLocked(),
		scope:    r.PostForm.Get("scope"),
		expires:  s.now().Add(deviceLifetime),
		interval: s.deviceInterval,
	}
	deviceCode := randomValue("dc-")
	s.devices[deviceCode] = g
	s.userCode[normalizeUserCode(g.userCode)] = g
	writeReply(w, jsonReply(http.StatusOK, map[string]any{
		"device_code":               deviceCode,
		"user_code":                 g.userCode,
		"verification_uri":          s.base + DevicePath,
		"verification_uri_complete": s.base + DevicePath + "?user_code=" + url.QueryEscape(g.userCode),
		"expires_in":                int64(deviceLifetime / time.Second),
		"interval":                  int64(math.Ceil(g.interval.Seconds())),
	}))
}

// newUserCodeLocked returns a user code no grant has: 8 letters of
// userCodeAlphabet (20^8, about 34 bits, RFC 8628 §5.1), as XXXX-XXXX.
func (s *Server) newUserCodeLocked() string {
	for {
		b := make([]byte, 8)
		rand.Read(b)
		for i := range b {
			b[i] = userCodeAlphabet[int(b[i])%len(userCodeAlphabet)]
		}
		code := string(b[:4]) + "-" + string(b[4:])
		if _, taken := s.userCode[normalizeUserCode(code)]; !taken {
			return code
		}
	}
}

// normalizeUserCode makes a typed user code comparable: case, spaces and
// dashes do not matter (RFC 8628 §6.1).
func normalizeUserCode(c string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r == '-' || r == ' ':
			return -1
		case r >= 'a' && r <= 'z':
			return r - 'a' + 'A'
		}
		return r
	}, c)
}

// pendingLocked returns the grant of a user code that may still be
// approved, or nil.
func (s *Server) pendingLocked(userCode string) *deviceGrant {
	g := s.userCode[normalizeUserCode(userCode)]
	if g == nil || g.state != devicePending || !s.now().Before(g.expires) {
		return nil
	}
	return g
}

// handleDevicePage is the verification page (RFC 8628 §3.3): without a
// user code it asks for one; with one (typed in, or in
// verification_uri_complete) it asks to approve the device.
func (s *Server) handleDevicePage(w http.ResponseWriter, r *http.Request) {
	code := r.URL.Query().Get("user_code")
	entry := page{
		Title: "Connect a device",
		Text:  []string{"Enter the code the device shows."},
		Form:  &form{Method: "get", Action: DevicePath, Input: "user_code", Buttons: []button{{"", "", "Continue"}}},
	}
	if code == "" {
		writePage(w, http.StatusOK, entry)
		return
	}
	s.mu.Lock()
	g := s.pendingLocked(code)
	var client string
	if g != nil {
		client = g.clientID
	}
	s.mu.Unlock()
	if g == nil {
		entry.Text = []string{"The code " + code + " is unknown, expired or already used. Enter the code the device shows now."}
		writePage(w, http.StatusBadRequest, entry)
		return
	}
	writePage(w, http.StatusOK, page{
		Title: "Authorize " + client + " on your device?",
		Text:  []string{"The device showing the code " + g.userCode + " asks to act on your behalf as " + client + ". Approve only if you started this on a device of yours."},
		Form:  &form{Method: "post", Action: DevicePath, Hidden: map[string]string{"user_code": g.userCode}, Buttons: decisionButtons},
	})
}

// handleDeviceDecision takes the verification page's answer.
func (s *Server) handleDeviceDecision(w http.ResponseWriter, r *http.Request) {
	r.ParseForm()
	s.mu.Lock()
	g := s.pendingLocked(r.PostForm.Get("user_code"))
	approve := r.PostForm.Get("decision") == "approve"
	if g != nil {
		g.state = deviceDenied
		if approve {
			g.state = deviceApproved
		}
	}
	s.mu.Unlock()
	switch {
	case g == nil:
		writePage(w, http.StatusBadRequest, page{Title: "Code expired", Text: []string{"This code is unknown, expired or already answered: start again on the device."}})
	case approve:
		writePage(w, http.StatusOK, page{Title: "Device approved", Text: []string{"You may close this window and return to your device."}})
	default:
		writePage(w, http.StatusOK, page{Title: "Device denied", Text: []string{"The device gets no access."}})
	}
}

// deviceCodeGrant answers a device's poll (RFC 8628 §3.4, §3.5).
func (s *Server) deviceCodeGrant(client string, form url.Values) reply {
	dc := form.Get("device_code")
	if dc == "" {
		return oauthError(http.StatusBadRequest, "invalid_request", "device_code is missing")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	g, ok := s.devices[dc]
	switch {
	case !ok:
		return oauthError(http.StatusBadRequest, "invalid_grant", "unknown device code")
	case g.clientID != client:
		return oauthError(http.StatusBadRequest, "invalid_grant", "device code was issued to another client")
	case g.state == deviceRedeemed:
		return oauthError(http.StatusBadRequest, "invalid_grant", "device code already used")
	case !now.Before(g.expires):
		return oauthError(http.StatusBadRequest, "expired_token", "the device code expired; start again")
	case g.state == deviceDenied:
		return oauthError(http.StatusBadRequest, "access_denied", "the user denied the request")
	case g.state == deviceApproved:
		g.state = deviceRedeemed
		return jsonReply(http.StatusOK, s.newGrantLocked(client, g.scope))
	}
	// Pending. A poll counts as too early when it comes before three
	// quarters of the interval have passed: polls on a ticker arrive a
	// little early or late, and that jitter must not cost the device a
	// slow_down.
	early := !g.lastPoll.IsZero() && now.Sub(g.lastPoll) < g.interval*3/4
	g.lastPoll = now
	if early {
		g.interval += 5 * time.Second
		return oauthError(http.StatusBadRequest, "slow_down", "polling too often; wait the interval, now 5 s longer")
	}
	return oauthError(http.StatusBadRequest, "authorization_pending", "the user has not answered yet")
}

// writeReply writes a reply of an endpoint other than the token endpoint,
// which has nothing to record.
func writeReply(w http.ResponseWriter, rep reply) {
	for k, v := range rep.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rep.status)
	w.Write(rep.body)
}
