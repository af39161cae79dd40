package events_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/authbus/authbus/events"
)

// A runtime that got a 401 publishes an auth.401 event; a refresher decodes it
// with the type and key taken from the NATS subject it arrived on.
func ExampleEncode() {
	subjects, _ := events.NewSubjects("") // the default prefix, "auth"
	key, _ := events.NewKey("acme", "alice", "github")
	accessToken := "gho_example"

	// Runtime side: publish b on subject with Nats-Msg-Id msgID.
	p := events.Unauthorized{
		Fingerprint: events.Fingerprint(accessToken), // never the token itself
		Runtime:     "mcp-client/host-1",
		Status:      401,
	}
	b, err := events.Encode(key, "mcp-client/host-1", p)
	if err != nil {
		panic(err)
	}
	subject := subjects.Event(events.Type401, key)
	msgID := events.MsgID(events.Type401, key, p.Fingerprint)
	fmt.Println(subject)
	fmt.Println(msgID)

	// Refresher side: the subject is authoritative for type and key.
	typ, k, err := subjects.ParseEvent(subject)
	if err != nil {
		panic(err)
	}
	ev, err := events.Decode(typ, k, b)
	if err != nil {
		panic(err) // a real consumer terminates the message with err as the reason
	}
	fmt.Println(ev.Type, ev.Subject, ev.Fingerprint(), ev.Unauthorized.Runtime)
	// Output:
	// auth.401.acme.alice.github
	// auth.401:acme.alice.github:d9b35348bca5da8a
	// auth.401 acme.alice.github d9b35348bca5da8a mcp-client/host-1
}

// An event whose subject attribute names another key than its NATS subject is
// refused: a tenant must not act on another tenant's key.
func ExampleDecode() {
	acme, _ := events.ParseKey("acme.alice.github")
	other, _ := events.ParseKey("other.alice.github")
	b, _ := events.Encode(other, "somewhere", events.Expiring{
		Fingerprint: events.Fingerprint("token"),
		ExpiresAt:   time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC),
	})

	_, err := events.Decode(events.TypeExpiring, acme, b)
	fmt.Println(errors.Is(err, events.ErrInvalidEvent))
	fmt.Println(err)
	// Output:
	// true
	// auth.expiring event for acme.alice.github: subject names the key "other.alice.github" but the event arrived on the subject of key "acme.alice.github"; the NATS subject is authoritative, publish each event on its own key's subject: invalid event
}

func ExampleParseKey() {
	k, err := events.ParseKey("acme.alice.github")
	fmt.Println(k.Tenant, k.User, k.Server, err)

	_, err = events.ParseKey("acme..github")
	fmt.Println(errors.Is(err, events.ErrInvalidKey))
	fmt.Println(err)
	// Output:
	// acme alice github <nil>
	// true
	// credential key "acme..github": user (part 2) is empty; keys are tenant.user.server, each [A-Za-z0-9_-]{1,64}: invalid credential key
}

func ExampleSubjects_EventsStream() {
	s, _ := events.NewSubjects("acme.auth")
	fmt.Println(s.EventsStream(), s.SchedulesStream(), s.ReauthStream(), s.LeasesBucket())
	fmt.Println(s.EventWildcard(events.TypeExpiring), s.ScheduleWildcard())
	// Output:
	// ACME_AUTH_EVENTS ACME_AUTH_SCHEDULES ACME_AUTH_REAUTH ACME_AUTH_LEASES
	// acme.auth.expiring.*.*.* acme.auth.proactive.*.*.*
}

// A register request with several mistakes is refused with all of them, each
// naming its field, on one line that fits a Nats-Service-Error header.
func ExampleDecodeRegisterRequest() {
	_, err := events.DecodeRegisterRequest([]byte(`{
		"token": {"access_token": "at", "expires_in": -60},
		"token_endpoint": "http://auth.example.com/token",
		"client_id": "authbus"
	}`))
	fmt.Println(errors.Is(err, events.ErrInvalidRequest))
	fmt.Println(err)
	// Output:
	// true
	// register request: token.expires_in is -60; send the token's lifetime in seconds (≥ 0), or leave it out; token_endpoint uses http; use https (http is allowed only for localhost, 127.0.0.0/8 and ::1): invalid register request
}

// Values that hold tokens print and log without them.
func ExampleRotated_String() {
	r := events.Rotated{
		AccessToken: "secret-access-token",
		TokenType:   "Bearer",
		Fingerprint: events.Fingerprint("secret-access-token"),
		Version:     3,
	}
	fmt.Println(r)
	// Output:
	// Rotated{access_token:REDACTED fingerprint:5964ad22c22eb5e8 version:3 expires_at:none}
}
