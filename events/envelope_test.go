package events_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

const (
	testSource = "authbus/test"
	testToken  = "AT-SECRET-0123456789"
)

var testKey = events.Key{Tenant: "acme", User: "alice", Server: "github"}

// samplePayloads returns one valid payload of every type, times in UTC.
func samplePayloads() []events.Payload {
	at := time.Date(2030, 1, 2, 3, 4, 5, 600, time.UTC)
	fp := events.Fingerprint(testToken)
	return []events.Payload{
		events.Unauthorized{Fingerprint: fp, Runtime: "mcp-client/host-1", Status: 401, URL: "https://api.example.com/v1?a=1&b=<2>", ObservedAt: at},
		events.Unauthorized{Fingerprint: fp, Runtime: "minimal"},
		events.Expiring{Fingerprint: fp, ExpiresAt: at},
		events.Rotated{AccessToken: testToken, TokenType: "Bearer", ExpiresAt: at, Fingerprint: fp, Version: 7},
		events.Rotated{AccessToken: testToken, TokenType: "bearer", Fingerprint: fp, Version: 1}, // no expiry
		events.NeedsReauth{Reason: "invalid_grant", ErrorDescription: "refresh token reused", Version: 3},
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	t.Parallel()
	for _, p := range samplePayloads() {
		t.Run(string(p.EventType()), func(t *testing.T) {
			t.Parallel()
			before := time.Now()
			b, err := events.Encode(testKey, testSource, p)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			ev, err := events.Decode(p.EventType(), testKey, b)
			if err != nil {
				t.Fatalf("Decode: %v\n%s", err, b)
			}
			if got := ev.Payload(); !reflect.DeepEqual(got, p) {
				t.Fatalf("payload = %#v, want %#v", got, p)
			}
			e := ev.Envelope
			if e.SpecVersion != "1.0" || e.Source != testSource || e.Type != p.EventType() ||
				e.Subject != "acme.alice.github" || e.DataContentType != "application/json" || e.ID == "" {
				t.Fatalf("envelope = %#v", e)
			}
			if e.Time.Location() != time.UTC || e.Time.Before(before.Add(-time.Second)) || e.Time.After(time.Now().Add(time.Second)) {
				t.Fatalf("time = %v, want now in UTC", e.Time)
			}
			if want := fingerprintOf(p); ev.Fingerprint() != want {
				t.Fatalf("Fingerprint() = %q, want %q", ev.Fingerprint(), want)
			}
		})
	}
}

func fingerprintOf(p events.Payload) string {
	switch p := p.(type) {
	case events.Unauthorized:
		return p.Fingerprint
	case events.Expiring:
		return p.Fingerprint
	case events.Rotated:
		return p.Fingerprint
	}
	return ""
}

// A consumer may reuse its receive buffer once Decode returns.
func TestDecodeDoesNotKeepInput(t *testing.T) {
	t.Parallel()
	b, err := events.Encode(testKey, testSource, samplePayloads()[3])
	if err != nil {
		t.Fatal(err)
	}
	ev, err := events.Decode(events.TypeRotated, testKey, b)
	if err != nil {
		t.Fatal(err)
	}
	want := string(ev.Data)
	for i := range b {
		b[i] = 'x'
	}
	if string(ev.Data) != want || ev.Rotated.AccessToken != testToken {
		t.Fatalf("the event changed with its input: data %s", ev.Data)
	}
}

func TestEncodeUniqueIDs(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for range 1000 {
		b, err := events.Encode(testKey, testSource, samplePayloads()[0])
		if err != nil {
			t.Fatal(err)
		}
		var e events.Envelope
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		if seen[e.ID] {
			t.Fatalf("id %q repeated", e.ID)
		}
		seen[e.ID] = true
	}
}

func TestEncodeWritesUTC(t *testing.T) {
	t.Parallel()
	cet := time.FixedZone("CET", 3600)
	p := events.Expiring{Fingerprint: events.Fingerprint(testToken), ExpiresAt: time.Date(2030, 1, 2, 4, 4, 5, 0, cet)}
	b, err := events.Encode(testKey, testSource, p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"expires_at":"2030-01-02T03:04:05Z"`) {
		t.Fatalf("expires_at not in UTC: %s", b)
	}
}

func TestEncodeRefuses(t *testing.T) {
	t.Parallel()
	fp := events.Fingerprint(testToken)
	tests := []struct {
		name   string
		key    events.Key
		source string
		p      events.Payload
		want   string
	}{
		{name: "invalid key", key: events.Key{Tenant: "acme"}, source: testSource, p: events.Expiring{Fingerprint: fp, ExpiresAt: time.Now()}, want: "user (part 2) is empty"},
		{name: "nil payload", key: testKey, source: testSource, p: nil, want: "payload is nil"},
		{name: "nil pointer payload", key: testKey, source: testSource, p: (*events.Rotated)(nil), want: "payload is nil"},
		{name: "no source", key: testKey, p: events.Expiring{Fingerprint: fp, ExpiresAt: time.Now()}, want: "source is missing"},
		{name: "invalid payload", key: testKey, source: testSource, p: events.Expiring{Fingerprint: fp}, want: "expires_at is missing"},
		{name: "too large", key: testKey, source: strings.Repeat("s", events.MaxEventSize), p: events.Expiring{Fingerprint: fp, ExpiresAt: time.Now()}, want: "over MaxEventSize"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := events.Encode(tt.key, tt.source, tt.p)
			if !errors.Is(err, events.ErrInvalidEvent) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Encode error = %v, want ErrInvalidEvent containing %q", err, tt.want)
			}
		})
	}
}

func TestEncodeAcceptsPointerPayload(t *testing.T) {
	t.Parallel()
	p := samplePayloads()[2].(events.Expiring)
	b, err := events.Encode(testKey, testSource, &p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := events.Decode(events.TypeExpiring, testKey, b); err != nil {
		t.Fatal(err)
	}
}

// wireEvent returns a valid event of type t as a generic JSON object, to be
// broken by a test case.
func wireEvent(t *testing.T, typ events.Type) map[string]any {
	t.Helper()
	for _, p := range samplePayloads() {
		if p.EventType() != typ {
			continue
		}
		b, err := events.Encode(testKey, testSource, p)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	t.Fatalf("no sample payload of type %s", typ)
	return nil
}

func TestDecodeRefuses(t *testing.T) {
	t.Parallel()
	otherFP := events.Fingerprint("other")
	setData := func(field string, v any) func(map[string]any) {
		return func(m map[string]any) { m["data"].(map[string]any)[field] = v }
	}
	delData := func(field string) func(map[string]any) {
		return func(m map[string]any) { delete(m["data"].(map[string]any), field) }
	}
	set := func(field string, v any) func(map[string]any) {
		return func(m map[string]any) { m[field] = v }
	}
	del := func(field string) func(map[string]any) {
		return func(m map[string]any) { delete(m, field) }
	}
	tests := []struct {
		name   string
		typ    events.Type
		mutate func(map[string]any) // applied to a valid event of typ
		raw    string               // used instead when set
		want   string               // the field the message must name, and more
	}{
		// Size and syntax.
		{name: "too large", typ: events.Type401, mutate: set("pad", strings.Repeat("x", events.MaxEventSize)), want: "size is"},
		{name: "not JSON", typ: events.Type401, raw: `{"specversion":`, want: "body is not valid JSON"},
		{name: "not an object", typ: events.Type401, raw: `["specversion"]`, want: "body is not a JSON object"},
		{name: "two objects", typ: events.Type401, raw: `{} {}`, want: "body is not valid JSON: invalid character '{' after top-level value"},
		{name: "invalid UTF-8", typ: events.Type401, raw: "{\"id\":\"\xff\"}", want: "body is not valid UTF-8"},
		{name: "attribute twice", typ: events.Type401, raw: `{"subject":"acme.alice.github","subject":"evil.alice.github"}`, want: `the field "subject" twice`},
		{name: "attribute in other case", typ: events.Type401, mutate: set("Subject", "evil.alice.github"), want: `"Subject" is not a field (names are case-sensitive); use "subject"`},

		// Envelope attributes, in the order Decode checks them.
		{name: "specversion missing", typ: events.Type401, mutate: del("specversion"), want: "specversion is missing"},
		{name: "specversion wrong", typ: events.Type401, mutate: set("specversion", "0.3"), want: `specversion is "0.3"; want "1.0"`},
		{name: "specversion not a string", typ: events.Type401, mutate: set("specversion", 1.0), want: "specversion is a number; want a string"},
		{name: "id missing", typ: events.Type401, mutate: del("id"), want: "id is missing"},
		{name: "source missing", typ: events.Type401, mutate: set("source", ""), want: "source is missing"},
		{name: "time missing", typ: events.Type401, mutate: del("time"), want: "time is missing"},
		{name: "time not RFC 3339", typ: events.Type401, mutate: set("time", "yesterday"), want: "time is not an RFC 3339 time"},
		{name: "time a number", typ: events.Type401, mutate: set("time", 1700000000), want: "time is not an RFC 3339 time"},
		{name: "type missing", typ: events.Type401, mutate: del("type"), want: `type is missing; send "auth.401"`},
		{name: "type of another subject", typ: events.Type401, mutate: set("type", "auth.expiring"), want: `type is "auth.expiring" but the event arrived on an auth.401 subject`},
		{name: "subject missing", typ: events.Type401, mutate: del("subject"), want: "subject is missing"},
		{name: "subject of another key", typ: events.Type401, mutate: set("subject", "evil.alice.github"), want: `subject names the key "evil.alice.github" but the event arrived on the subject of key "acme.alice.github"`},
		{name: "datacontenttype wrong", typ: events.Type401, mutate: set("datacontenttype", "text/plain"), want: `datacontenttype is "text/plain"`},
		{name: "data missing", typ: events.Type401, mutate: del("data"), want: "data is missing"},
		{name: "data null", typ: events.Type401, mutate: set("data", nil), want: "data is missing"},
		{name: "data not an object", typ: events.Type401, mutate: set("data", "fingerprint"), want: "data is not a JSON object"},
		{name: "data field in other case", typ: events.Type401, mutate: setData("Fingerprint", otherFP), want: `"data.Fingerprint" is not a field (names are case-sensitive); use "fingerprint"`},

		// auth.401 data.
		{name: "401 fingerprint missing", typ: events.Type401, mutate: delData("fingerprint"), want: "data.fingerprint is missing"},
		{name: "401 fingerprint upper case", typ: events.Type401, mutate: setData("fingerprint", strings.ToUpper(otherFP)), want: "data.fingerprint is 16 bytes but not 16 lowercase hex"},
		{name: "401 fingerprint is the token", typ: events.Type401, mutate: setData("fingerprint", testToken), want: "data.fingerprint is"},
		{name: "401 runtime missing", typ: events.Type401, mutate: delData("runtime"), want: "data.runtime is missing"},
		{name: "401 runtime too long", typ: events.Type401, mutate: setData("runtime", strings.Repeat("r", events.MaxRuntimeLen+1)), want: "data.runtime is 257 bytes"},
		{name: "401 status out of range", typ: events.Type401, mutate: setData("status", 42), want: "data.status is 42"},
		{name: "401 status a string", typ: events.Type401, mutate: setData("status", "401"), want: "data.status is a string; want an integer"},
		{name: "401 status a fraction", typ: events.Type401, mutate: setData("status", 401.5), want: "data.status is the number 401.5; want an integer"},
		{name: "401 url too long", typ: events.Type401, mutate: setData("url", strings.Repeat("u", events.MaxURLLen+1)), want: "data.url is 2049 bytes"},
		{name: "401 observed_at not a time", typ: events.Type401, mutate: setData("observed_at", "now"), want: "data.observed_at is not an RFC 3339 time"},
		{name: "401 observed_at before year 1 in UTC", typ: events.Type401, mutate: setData("observed_at", "0000-01-01T00:00:00+01:00"), want: "data.observed_at is in the year -1"},

		// auth.expiring data.
		{name: "expiring fingerprint missing", typ: events.TypeExpiring, mutate: delData("fingerprint"), want: "data.fingerprint is missing"},
		{name: "expiring expires_at missing", typ: events.TypeExpiring, mutate: delData("expires_at"), want: "data.expires_at is missing"},

		// auth.rotated data.
		{name: "rotated access_token missing", typ: events.TypeRotated, mutate: delData("access_token"), want: "data.access_token is missing"},
		{name: "rotated access_token with a line break", typ: events.TypeRotated, mutate: setData("access_token", "a\r\nX-Evil: 1"), want: "data.access_token has characters outside printable ASCII"},
		{name: "rotated token_type missing", typ: events.TypeRotated, mutate: delData("token_type"), want: "data.token_type is missing"},
		{name: "rotated token_type two words", typ: events.TypeRotated, mutate: setData("token_type", "Bearer x"), want: "data.token_type is \"Bearer x\""},
		{name: "rotated fingerprint of another token", typ: events.TypeRotated, mutate: setData("fingerprint", otherFP), want: "data.fingerprint does not match access_token"},
		{name: "rotated version 0", typ: events.TypeRotated, mutate: setData("version", 0), want: "data.version is 0"},
		{name: "rotated version a string", typ: events.TypeRotated, mutate: setData("version", "7"), want: "data.version is a string; want an integer"},

		// auth.needs_reauth data.
		{name: "needs_reauth reason missing", typ: events.TypeNeedsReauth, mutate: delData("reason"), want: "data.reason is missing"},
		{name: "needs_reauth version missing", typ: events.TypeNeedsReauth, mutate: delData("version"), want: "data.version is 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := []byte(tt.raw)
			if tt.raw == "" {
				m := wireEvent(t, tt.typ)
				tt.mutate(m)
				var err error
				if b, err = json.Marshal(m); err != nil {
					t.Fatal(err)
				}
			}
			ev, err := events.Decode(tt.typ, testKey, b)
			if err == nil {
				t.Fatalf("Decode accepted %s as %#v", b, ev)
			}
			if !errors.Is(err, events.ErrInvalidEvent) {
				t.Fatalf("error %v does not wrap ErrInvalidEvent", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error = %q\nwant it to contain %q", err, tt.want)
			}
			if strings.Contains(err.Error(), testToken) {
				t.Fatalf("error repeats the access token: %q", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error has a line break: %q", err)
			}
		})
	}
}

func TestDecodeArguments(t *testing.T) {
	t.Parallel()
	b, err := events.Encode(testKey, testSource, samplePayloads()[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := events.Decode("auth.token", testKey, b); !errors.Is(err, events.ErrInvalidEvent) || !strings.Contains(err.Error(), "not an event type") {
		t.Fatalf("Decode with a bad type: %v", err)
	}
	_, err = events.Decode(events.Type401, events.Key{}, b)
	if !errors.Is(err, events.ErrInvalidEvent) || !errors.Is(err, events.ErrInvalidKey) {
		t.Fatalf("Decode with a bad key: %v, want ErrInvalidEvent and ErrInvalidKey", err)
	}
}

func TestDecodeAccepts(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		typ    events.Type
		mutate func(map[string]any)
		check  func(*testing.T, *events.Event)
	}{
		{name: "extension attribute", typ: events.Type401, mutate: func(m map[string]any) { m["traceparent"] = "00-abc" }},
		{name: "unknown data field from a newer publisher", typ: events.Type401, mutate: func(m map[string]any) { m["data"].(map[string]any)["method"] = "GET" }},
		{name: "no datacontenttype", typ: events.Type401, mutate: func(m map[string]any) { delete(m, "datacontenttype") }},
		{name: "datacontenttype with charset", typ: events.Type401, mutate: func(m map[string]any) { m["datacontenttype"] = "application/json; charset=utf-8" }},
		{
			name: "times with an offset come back in UTC", typ: events.TypeExpiring,
			mutate: func(m map[string]any) {
				m["time"] = "2030-01-02T04:04:05+01:00"
				m["data"].(map[string]any)["expires_at"] = "2030-01-02T05:04:05+02:00"
			},
			check: func(t *testing.T, ev *events.Event) {
				want := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
				if ev.Time != want || ev.Expiring.ExpiresAt != want {
					t.Fatalf("time = %v, expires_at = %v, want %v for both", ev.Time, ev.Expiring.ExpiresAt, want)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := wireEvent(t, tt.typ)
			tt.mutate(m)
			b, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			ev, err := events.Decode(tt.typ, testKey, b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if tt.check != nil {
				tt.check(t, ev)
			}
		})
	}
}
