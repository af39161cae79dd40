package authtest

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// MetadataServer is a stand-in issuer whose discovery documents (and
// redirects, errors, garbage) a test writes by hand, for the answers the
// authorization server does not give. It counts the requests per path. Its
// methods are safe for concurrent use.
type MetadataServer struct {
	*httptest.Server
	mu    sync.Mutex
	paths map[string]int
}

// NewMetadataServer starts a MetadataServer on 127.0.0.1 (plain HTTP) that
// answers every request with h, and closes it when the test ends.
func NewMetadataServer(t testing.TB, h func(s *MetadataServer, w http.ResponseWriter, r *http.Request)) *MetadataServer {
	t.Helper()
	s := &MetadataServer{paths: map[string]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.paths[r.URL.Path]++
		s.mu.Unlock()
		h(s, w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

// Requests returns how many requests have arrived, on any path.
func (s *MetadataServer) Requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.paths {
		n += c
	}
	return n
}

// RequestsTo returns how many requests have arrived for path.
func (s *MetadataServer) RequestsTo(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.paths[path]
}

// WriteJSON answers with v as a JSON document.
func WriteJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}
