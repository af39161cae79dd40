package workers

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/authbus/authbus/kv"
)

func TestFailureCause(t *testing.T) {
	t.Parallel()
	c := &kv.Credential{RefreshToken: "rt-secret-1234", ClientSecret: "cs-secret-5678", AccessToken: "at-secret-9012"}
	const endpoint = "https://idp.example/token?api_key=query-secret"
	dns := &url.Error{Op: "Post", URL: endpoint, Err: &net.OpError{Op: "dial", Net: "tcp",
		Err: &net.DNSError{Err: "no such host", Name: "idp.example", IsNotFound: true}}}
	retrieve := func(status int, code, desc string, h http.Header) error {
		return &oauth2.RetrieveError{Response: &http.Response{StatusCode: status, Header: h}, ErrorCode: code, ErrorDescription: desc}
	}
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"DNS failure", dns, "token endpoint unreachable: dial tcp: lookup idp.example: no such host"},
		{"timeout", &url.Error{Op: "Post", URL: endpoint, Err: context.DeadlineExceeded},
			"token endpoint did not answer within 30s (--token-timeout)"},
		{"server error with code and Retry-After", retrieve(503, "temporarily_unavailable", "maintenance", http.Header{"Retry-After": {"7"}}),
			`token endpoint answered HTTP 503 temporarily_unavailable "maintenance" (Retry-After 7s)`},
		{"secret echoed by the server", retrieve(500, "server_error", "bad token rt-secret-1234", nil),
			`token endpoint answered HTTP 500 server_error "bad token [redacted]"`},
		{"malformed answer", errors.New("oauth2: server response missing access_token"),
			"token endpoint call failed: oauth2: server response missing access_token"},
		{"very long description", retrieve(502, "", strings.Repeat("é", 400), nil), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := failureCause(tt.err, classify(tt.err), c, 30*time.Second)
			if tt.want != "" && got != tt.want {
				t.Errorf("cause\n got %q\nwant %q", got, tt.want)
			}
			if len(got) > maxCauseLen+len("…") || !strings.HasPrefix(got, "token endpoint ") {
				t.Errorf("cause %q: want at most %d bytes starting with the token endpoint", got, maxCauseLen)
			}
			for _, secret := range []string{"query-secret", "rt-secret", "cs-secret", "at-secret"} {
				if strings.Contains(got, secret) {
					t.Errorf("cause %q holds %s", got, secret)
				}
			}
		})
	}
}
