package events_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/authbus/authbus/events"
)

// The fuzzers check, for any input: no panic; a refusal wraps the package's
// sentinel in a single-line message; an acceptance yields a value that
// validates and survives encoding and decoding again unchanged. Seeds are in
// testdata/fuzz/<FuzzName>/ besides the f.Add calls.

func FuzzParseKey(f *testing.F) {
	for _, s := range []string{"acme.alice.github", "a-b.c_d.E9", "a..b", "a.b.c.d", "", "a.b.ç", ".", "a.b.*"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := events.ParseKey(s)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidKey) {
				t.Fatalf("ParseKey(%q) error %v does not wrap ErrInvalidKey", s, err)
			}
			checkOneLine(t, err)
			return
		}
		if err := k.Validate(); err != nil {
			t.Fatalf("ParseKey(%q) = %+v, which does not validate: %v", s, k, err)
		}
		if k.String() != s {
			t.Fatalf("ParseKey(%q).String() = %q", s, k.String())
		}
		if again, err := events.NewKey(k.Tenant, k.User, k.Server); err != nil || again != k {
			t.Fatalf("NewKey(parts of %q) = %+v, %v", s, again, err)
		}
	})
}

var fuzzTypes = [...]events.Type{events.Type401, events.TypeExpiring, events.TypeRotated, events.TypeNeedsReauth}

func FuzzDecode(f *testing.F) {
	for i, p := range samplePayloads() {
		b, err := events.Encode(testKey, testSource, p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i%len(fuzzTypes)), b) // valid ones and, for mismatched types, invalid ones
	}
	f.Add(uint8(0), []byte(`{"specversion":"1.0","data":null}`))
	f.Add(uint8(1), []byte(`not json`))
	f.Fuzz(func(t *testing.T, sel uint8, b []byte) {
		typ := fuzzTypes[int(sel)%len(fuzzTypes)]
		ev, err := events.Decode(typ, testKey, b)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidEvent) {
				t.Fatalf("Decode error %v does not wrap ErrInvalidEvent", err)
			}
			checkOneLine(t, err)
			return
		}
		p := ev.Payload()
		if p == nil || ev.Type != typ || p.EventType() != typ {
			t.Fatalf("Decode(%s) = type %s, payload %#v", typ, ev.Type, p)
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("decoded payload does not validate: %v", err)
		}

		// The envelope, re-encoded as it is, decodes to the same event.
		re, err := json.Marshal(ev.Envelope)
		if err != nil {
			t.Fatalf("re-encoding the envelope: %v", err)
		}
		if len(re) <= events.MaxEventSize { // escaping may have grown it
			again, err := events.Decode(typ, testKey, re)
			if err != nil {
				t.Fatalf("decoding the re-encoded envelope: %v\n%s", err, re)
			}
			if !reflect.DeepEqual(again.Payload(), p) || !sameEnvelope(again.Envelope, ev.Envelope) {
				t.Fatalf("re-encoded event differs:\n%#v\n%#v", again, ev)
			}
		}

		// The payload, published again with Encode, decodes to itself.
		re, err = events.Encode(testKey, ev.Source, p)
		if err != nil {
			if !strings.Contains(err.Error(), "over MaxEventSize") {
				t.Fatalf("Encode of a decoded payload: %v", err)
			}
			return
		}
		again, err := events.Decode(typ, testKey, re)
		if err != nil {
			t.Fatalf("decoding what Encode made: %v\n%s", err, re)
		}
		if !reflect.DeepEqual(again.Payload(), p) {
			t.Fatalf("payload after Encode+Decode = %#v, want %#v", again.Payload(), p)
		}
	})
}

// sameEnvelope compares envelopes except for the spelling of Data, which
// re-encoding compacts.
func sameEnvelope(a, b events.Envelope) bool {
	a.Data, b.Data = nil, nil
	return reflect.DeepEqual(a, b)
}

func FuzzDecodeRegisterRequest(f *testing.F) {
	f.Add([]byte(`{"token":{"access_token":"at","refresh_token":"rt","expires_in":3600},"token_endpoint":"https://a.example/token","client_id":"c"}`))
	f.Add([]byte(`{"token":{"access_token":"at","expires_at":"2030-01-02T03:04:05+01:00"},"issuer":"http://127.0.0.1:9/","client_id":"c","grant":"client_credentials","client_secret":"s","scopes":["a","b"],"resource":"urn:x"}`))
	f.Add([]byte(`{"token":{"access_token":"at","expires_in":1,"expires_at":"2030-01-02T03:04:05Z"},"client_id":"c"}`))
	f.Add([]byte(`{"token":null,"Client_ID":"c","x":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Whatever the body, padded past the limit it is refused for its size.
		if len(b) <= events.MaxRegisterSize {
			big := append(bytes.Repeat([]byte(" "), events.MaxRegisterSize+1-len(b)), b...)
			if _, err := events.DecodeRegisterRequest(big); err == nil || !strings.HasPrefix(err.Error(), "register request: size is ") {
				t.Fatalf("a %d-byte body: %v, want a refusal naming the size", len(big), err)
			}
		}
		r, err := events.DecodeRegisterRequest(b)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidRequest) {
				t.Fatalf("error %v does not wrap ErrInvalidRequest", err)
			}
			checkOneLine(t, err)
			checkNamesField(t, b, err)
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("decoded request does not validate: %v", err)
		}
		re, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("re-encoding: %v", err)
		}
		if len(re) > events.MaxRegisterSize { // escaping may have grown it
			return
		}
		again, err := events.DecodeRegisterRequest(re)
		if err != nil {
			t.Fatalf("decoding the re-encoded request: %v\n%s", err, re)
		}
		if !reflect.DeepEqual(again, r) {
			t.Fatalf("re-encoded request differs:\n%#v\n%#v", again, r)
		}
	})
}

func FuzzSubjectsParse(f *testing.F) {
	f.Add("", "auth.401.acme.alice.github")
	f.Add("acme.auth", "acme.auth.token.a.b.c")
	f.Add("", "auth.401.*.*.*")
	f.Add("", "auth.needs_reauth.a.b")
	f.Add("a..b", "a..b.401.a.b.c")
	f.Fuzz(func(t *testing.T, prefix, subject string) {
		s, err := events.NewSubjects(prefix)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidSubject) {
				t.Fatalf("NewSubjects(%q) error %v does not wrap ErrInvalidSubject", prefix, err)
			}
			checkOneLine(t, err)
			return
		}
		word, k, err := s.Parse(subject)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidSubject) {
				t.Fatalf("Parse(%q) error %v does not wrap ErrInvalidSubject", subject, err)
			}
			checkOneLine(t, err)
			return
		}
		if err := k.Validate(); err != nil {
			t.Fatalf("Parse(%q) key %+v does not validate: %v", subject, k, err)
		}
		if got := s.Prefix() + "." + word + "." + k.String(); got != subject {
			t.Fatalf("Parse(%q) = %q, %+v, which builds %q", subject, word, k, got)
		}
		typ, k2, err := s.ParseEvent(subject)
		if err != nil {
			if !errors.Is(err, events.ErrInvalidSubject) {
				t.Fatalf("ParseEvent(%q) error %v does not wrap ErrInvalidSubject", subject, err)
			}
			return
		}
		if k2 != k || s.Event(typ, k) != subject {
			t.Fatalf("ParseEvent(%q) = %s, %+v, which builds %q", subject, typ, k2, s.Event(typ, k))
		}
	})
}

// registerField matches the start of a register refusal: the size, the body
// as a whole, a field of the request by its JSON path, or an unknown member
// by its quoted path.
var registerField = regexp.MustCompile(`^register request: (size|body|token(\.(access_token|token_type|refresh_token|expires_in|expires_at))?|token_endpoint|issuer|client_id|client_secret|auth_style|grant|scopes(\[\d+\])?|resource|"(\\.|[^"\\])*"…?) `)

// checkNamesField fails unless the refusal err of the register body b
// starts by naming the field at fault, or the size; "body" is only for a
// body that is not one JSON object in UTF-8, or one that repeats a field
// (which the message then names).
func checkNamesField(t *testing.T, b []byte, err error) {
	t.Helper()
	m := registerField.FindStringSubmatch(err.Error())
	if m == nil {
		t.Fatalf("refusal names no field: %q", err)
	}
	if m[1] == "body" && !strings.HasPrefix(err.Error(), "register request: body has the field ") && json.Valid(b) && utf8.Valid(b) && bytes.HasPrefix(bytes.TrimLeft(b, " \t\r\n"), []byte("{")) {
		t.Fatalf("refusal of a JSON object blames the whole body: %q", err)
	}
}

// checkOneLine fails when err's message spans lines: messages become
// Nats-Service-Error headers and termination reasons.
func checkOneLine(t *testing.T, err error) {
	t.Helper()
	if strings.ContainsAny(err.Error(), "\r\n") {
		t.Fatalf("error message spans lines: %q", err)
	}
}

// FuzzTruncateText: whatever a server writes as error code and description,
// cut to MaxReasonLen and MaxErrorDescriptionLen they fit an
// auth.needs_reauth for the longest key, read back as written, stay on one
// line, and are what was given when it was short and clean.
func FuzzTruncateText(f *testing.F) {
	f.Add("invalid_grant", "refresh token reused")
	f.Add(strings.Repeat("<", 300), strings.Repeat("<&>\"\\", 5000))
	f.Add("x\n", strings.Repeat("\x00\xff\u2028é", 3000))
	long := strings.Repeat("k", events.MaxKeyPartLen)
	key := events.Key{Tenant: long, User: long, Server: long}
	f.Fuzz(func(t *testing.T, reason, description string) {
		r := events.TruncateText(reason, events.MaxReasonLen)
		d := events.TruncateText(description, events.MaxErrorDescriptionLen)
		if len(r) > events.MaxReasonLen || len(d) > events.MaxErrorDescriptionLen {
			t.Fatalf("cut to %d and %d bytes", len(r), len(d))
		}
		if !utf8.ValidString(d) || strings.ContainsAny(d, "\r\n\u2028") {
			t.Fatalf("description %q is not one line of UTF-8", d)
		}
		if utf8.ValidString(description) && len(description) <= events.MaxErrorDescriptionLen &&
			!strings.ContainsFunc(description, unicode.IsControl) && !strings.ContainsAny(description, "\u2028\u2029") && d != description {
			t.Fatalf("a short clean description was changed: %q → %q", description, d)
		}
		if r == "" {
			r = "x"
		}
		data, err := events.Encode(key, "authbus/refresher/fuzz", events.NeedsReauth{Reason: r, ErrorDescription: d, Version: 1})
		if err != nil {
			t.Fatalf("a cut needs_reauth does not encode: %v", err)
		}
		ev, err := events.Decode(events.TypeNeedsReauth, key, data)
		if err != nil || ev.NeedsReauth.Reason != r || ev.NeedsReauth.ErrorDescription != d {
			t.Fatalf("a cut needs_reauth does not read back: %v", err)
		}
	})
}
