package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestProbe(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) }))
	defer ok.Close()
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "nats: not connected", http.StatusServiceUnavailable)
	}))
	defer down.Close()
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()

	for _, tc := range []struct {
		name string
		args []string
		want int
		says string
	}{
		{"2xx", []string{ok.URL + "/readyz"}, 0, ""},
		{"every URL must answer", []string{ok.URL, down.URL}, 1, "503"},
		{"error status names the body", []string{down.URL}, 1, "not connected"},
		{"connection refused", []string{closed.URL}, 1, "GET"},
		{"no URL", nil, 2, "no URL"},
		{"not a URL", []string{"::"}, 1, "absolute http URL"},
		{"help", []string{"--help"}, 0, "Usage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if got := run(tc.args, &stderr); got != tc.want || !strings.Contains(stderr.String(), tc.says) {
				t.Errorf("probe %v = %d, %q; want %d and a message with %q", tc.args, got, stderr.String(), tc.want, tc.says)
			}
		})
	}
}
