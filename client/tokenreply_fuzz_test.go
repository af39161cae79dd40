package client_test

import (
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/natstest"
)

// fuzzStatuses are the Nats-Service-Error-Code values a reply may carry:
// none (a token), the protocol's five, and two it does not define.
var fuzzStatuses = [...]string{"", "400", "403", "404", "409", "503", "500", "x"}

// tokenReply is one fuzzed auth.token answer.
type tokenReply struct {
	status, desc string
	data         []byte
}

// FuzzTokenReply answers a Source's real auth.token request, over a real
// NATS server, with any body and error headers, and checks what Token makes
// of it: no panic; a token only from a reply that decodes to valid
// auth.rotated data, and then exactly that token; otherwise the error the
// status calls for (ErrNotFound, ErrRefused, ErrUnavailable, or a
// *NeedsReauthError), never with a long access token from the body in its
// text.
func FuzzTokenReply(f *testing.F) {
	valid, err := json.Marshal(events.Rotated{AccessToken: "at-0123456789abcdef0123", TokenType: "Bearer",
		Fingerprint: events.Fingerprint("at-0123456789abcdef0123"), Version: 3})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(uint8(0), "", valid)
	f.Add(uint8(0), "", []byte(`{"access_token":"at","token_type":"bearer","expires_at":"2030-01-02T03:04:05Z","fingerprint":"b1d6b91b67c2afa5","version":1}`))
	f.Add(uint8(0), "", []byte(`{"access_token":"","version":0}`))
	f.Add(uint8(0), "", []byte(`null`))
	f.Add(uint8(0), "", []byte{})
	f.Add(uint8(3), "credential not registered", []byte(`{"error":"not_found","error_description":"register it first"}`))
	f.Add(uint8(4), "", []byte(`{"error":"needs_reauth","error_description":"log in again","reason":"invalid_grant"}`))
	f.Add(uint8(4), "needs re-auth", []byte(`not json`))
	f.Add(uint8(1), "token_type is missing", []byte(`{"error":"invalid_request"}`))
	f.Add(uint8(5), "no store", []byte(`{"error":"unavailable"}`))
	f.Add(uint8(7), "", valid)

	const key = "acme.alice.github"
	nc := natstest.Connect(f, natstest.RunServer(f))
	var current atomic.Pointer[tokenReply]
	sub, err := nc.Subscribe("auth.token."+key, func(m *nats.Msg) {
		r := current.Load()
		reply := nats.NewMsg(m.Reply)
		reply.Data = r.data
		if r.status != "" {
			reply.Header.Set(micro.ErrorCodeHeader, r.status)
			reply.Header.Set(micro.ErrorHeader, r.desc)
		}
		_ = m.RespondMsg(reply)
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = sub.Unsubscribe() })

	f.Fuzz(func(t *testing.T, sel uint8, desc string, data []byte) {
		status := fuzzStatuses[int(sel)%len(fuzzStatuses)]
		current.Store(&tokenReply{status: status, desc: headerSafe(desc), data: data})
		s, err := client.New(nc, key)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		tok, err := s.Token()

		var want events.Rotated
		decoded := json.Unmarshal(data, &want) == nil && want.Validate() == nil
		switch {
		case status == "" && decoded:
			if err != nil {
				t.Fatalf("a valid reply gave %v", err)
			}
			if tok.AccessToken != want.AccessToken || tok.TokenType != want.TokenType || !tok.Expiry.Equal(want.ExpiresAt) {
				t.Fatalf("token %q %q %v, reply %q %q %v", tok.AccessToken, tok.TokenType, tok.Expiry, want.AccessToken, want.TokenType, want.ExpiresAt)
			}
			return
		case err == nil:
			t.Fatalf("status %q body %q gave a token %+v", status, data, tok)
		case status == "":
			if !errors.Is(err, client.ErrUnavailable) {
				t.Fatalf("a malformed reply gave %v, want ErrUnavailable", err)
			}
		case status == "404":
			if !errors.Is(err, client.ErrNotFound) {
				t.Fatalf("status 404 gave %v, want ErrNotFound", err)
			}
		case status == "409":
			var nr *client.NeedsReauthError
			if !errors.As(err, &nr) || nr.Reason == "" {
				t.Fatalf("status 409 gave %v, want a *NeedsReauthError with a reason", err)
			}
		case status == "400" || status == "403":
			if !errors.Is(err, client.ErrRefused) {
				t.Fatalf("status %s gave %v, want ErrRefused", status, err)
			}
		default:
			if !errors.Is(err, client.ErrUnavailable) {
				t.Fatalf("status %s gave %v, want ErrUnavailable", status, err)
			}
		}
		// A reply must never make the client print a token it carried.
		if len(want.AccessToken) >= 24 && strings.Contains(err.Error(), want.AccessToken) {
			t.Fatalf("error %q repeats the reply's access token", err)
		}
	})
}

// headerSafe keeps the printable ASCII of s: a NATS header value cannot hold
// line breaks, and the responder is not what is under test.
func headerSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return -1
		}
		return r
	}, s)
}
