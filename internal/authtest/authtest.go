// Package authtest runs an authorization server (internal/authserver) for a
// test: it listens on a random port of 127.0.0.1, is closed when the test
// ends, and turns misuse (Issue for an unknown client, Revoke of an unknown
// token) into test failures. Browser and ApproveDevice play the person who
// logs in.
//
// Every integration test of the refresher talks to one of these servers over
// real HTTP and then asserts on what it counted (Calls, Reuses, CallLog);
// see authserver for what the server imitates.
package authtest

import (
	"testing"

	"github.com/authbus/authbus/internal/authserver"
)

// ReuseMode says how the server answers a refresh token that was already
// redeemed; see authserver.ReuseMode.
type ReuseMode = authserver.ReuseMode

// The reuse modes; see authserver.
const (
	ReuseInvalidGrant      = authserver.ReuseInvalidGrant
	ReuseInvalidGrant403   = authserver.ReuseInvalidGrant403
	ReuseDexInvalidRequest = authserver.ReuseDexInvalidRequest
	ReuseRevokeFamily      = authserver.ReuseRevokeFamily
)

// The paths of the discovery documents, relative to BaseURL.
const (
	MetadataPath            = authserver.MetadataPath
	OpenIDConfigurationPath = authserver.OpenIDConfigurationPath
)

// Tokens are the tokens of a new grant; see authserver.Tokens.
type Tokens = authserver.Tokens

// Call is the record of one token-endpoint call; see authserver.Call.
type Call = authserver.Call

// Server is an authserver.Server that belongs to a test. All of its
// methods are safe for concurrent use.
type Server struct {
	*authserver.Server
	t testing.TB
}

// New starts an authorization server on a random port of 127.0.0.1 (plain
// HTTP) and closes it when the test ends. Its defaults are authserver's.
func New(t testing.TB) *Server {
	t.Helper()
	s, err := authserver.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &Server{Server: s, t: t}
}

// Issue creates a new grant for a known client, as an interactive login
// would, and returns its tokens (see authserver.Server.Issue). An unknown
// client fails the test.
func (s *Server) Issue(clientID string) Tokens {
	s.t.Helper()
	tok, err := s.Server.Issue(clientID)
	if err != nil {
		s.t.Fatal(err)
	}
	return tok
}

// Revoke revokes the token family of a refresh or access token (see
// authserver.Server.Revoke). An unknown token fails the test.
func (s *Server) Revoke(token string) {
	s.t.Helper()
	if err := s.Server.Revoke(token); err != nil {
		s.t.Error(err)
	}
}
