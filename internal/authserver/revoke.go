package authserver

import (
	"net/http"
	"time"
)

// Revocation is the record of one call of the revocation endpoint, as
// returned by Server.Revocations.
type Revocation struct {
	At       time.Time // arrival, on the server's clock
	ClientID string    // the client the call claimed to be
	Token    string    // as presented
	TypeHint string    // token_type_hint as sent
	Status   int       // the HTTP status answered
	Error    string    // OAuth error code answered, "" on success
}

// Revocations returns a copy of the record of every revocation call, in
// arrival order.
func (s *Server) Revocations() []Revocation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Revocation(nil), s.revocations...)
}

// handleRevocation is the revocation endpoint (RFC 7009). The client
// authenticates as at the token endpoint and may revoke only its own
// tokens. Revoking a refresh token ends its grant: the whole token family,
// its access tokens included (§2.1 lets the server do so, and most do).
// Revoking an access token ends that token only. A token the server does
// not know is answered 200 like any other (§2.2): the client could do
// nothing with an error, and the token is invalid either way. The
// token_type_hint only speeds a real server's lookup; here it changes
// nothing.
func (s *Server) handleRevocation(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	off := s.noRevocation
	s.mu.Unlock()
	if off {
		http.NotFound(w, r)
		return
	}
	r.ParseForm()
	rec := Revocation{ClientID: claimedClient(r, r.PostForm), Token: r.PostForm.Get("token"), TypeHint: r.PostForm.Get("token_type_hint")}
	rep := s.revoke(r, rec.Token)
	s.mu.Lock()
	rec.At, rec.Status, rec.Error = s.now(), rep.status, rep.errCode
	s.revocations = append(s.revocations, rec)
	s.mu.Unlock()
	writeReply(w, rep)
}

func (s *Server) revoke(r *http.Request, token string) reply {
	if r.Method != http.MethodPost {
		rep := oauthError(http.StatusMethodNotAllowed, "invalid_request", "the revocation endpoint accepts POST only")
		rep.header.Set("Allow", http.MethodPost)
		return rep
	}
	client, rep, ok := s.authenticate(r)
	if !ok {
		return rep
	}
	if token == "" {
		return oauthError(http.StatusBadRequest, "invalid_request", "token is missing")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if rt, ok := s.refresh[token]; ok {
		if rt.fam.clientID != client {
			return oauthError(http.StatusBadRequest, "unauthorized_client", "the token was issued to another client")
		}
		s.revokeLocked(rt.fam, "token revoked")
	} else if at, ok := s.access[token]; ok {
		if at.clientID != client {
			return oauthError(http.StatusBadRequest, "unauthorized_client", "the token was issued to another client")
		}
		at.revoked = true
	}
	return reply{status: http.StatusOK, header: http.Header{"Cache-Control": {"no-store"}}}
}
