package fleet

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// ResourceServer is an API protected by the fleet's test authorization
// server, as a runtime's client library meets it: it answers 200 to a
// request whose bearer token the authorization server considers valid
// (AS.ValidAccessToken) and the test has not retired, and 401 otherwise. It
// counts every request. It is safe for concurrent use.
type ResourceServer struct {
	*httptest.Server

	mu      sync.Mutex
	retired map[string]bool
	hits    int
	byID    map[string]int // hits per RequestIDHeader value
	status  map[int]int    // hits per answered status
}

// RequestIDHeader is the request header by which ResourceServer counts the
// attempts of one logical request (HitsFor).
const RequestIDHeader = "X-Test-Request-Id"

// NewResourceServer starts a ResourceServer that trusts b.AS and closes it
// when the test ends.
func (b *Fleet) NewResourceServer(t testing.TB) *ResourceServer {
	t.Helper()
	rs := &ResourceServer{retired: map[string]bool{}, byID: map[string]int{}, status: map[int]int{}}
	rs.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		rs.mu.Lock()
		ok = ok && !rs.retired[tok] && b.AS.ValidAccessToken(tok)
		status := http.StatusOK
		if !ok {
			status = http.StatusUnauthorized
		}
		rs.hits++
		rs.byID[r.Header.Get(RequestIDHeader)]++
		rs.status[status]++
		rs.mu.Unlock()
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			http.Error(w, "invalid token", status)
			return
		}
		w.Write([]byte("hello"))
	}))
	t.Cleanup(rs.Close)
	return rs
}

// Retire makes the server refuse tok from now on, as a resource server does
// with a token its authorization server still lists as valid (revoked
// elsewhere, or an audience change).
func (rs *ResourceServer) Retire(tok string) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.retired[tok] = true
}

// Hits returns how many requests arrived.
func (rs *ResourceServer) Hits() int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.hits
}

// HitsFor returns how many requests arrived with RequestIDHeader id.
func (rs *ResourceServer) HitsFor(id string) int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.byID[id]
}

// Answered returns how many requests were answered with status.
func (rs *ResourceServer) Answered(status int) int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.status[status]
}
