package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"reflect"
	"time"

	"github.com/nats-io/nuid"
)

// SpecVersion is the CloudEvents version of every event.
const SpecVersion = "1.0"

// ContentType is the datacontenttype of every event's data, and the content
// type of request and reply bodies.
const ContentType = "application/json"

// Size limits, checked before any parsing.
const (
	// MaxEventSize is the largest encoded event, in bytes.
	MaxEventSize = 16 << 10
	// MaxRegisterSize is the largest auth.register request body, in bytes.
	MaxRegisterSize = 64 << 10
)

// ErrInvalidEvent is wrapped by every error about an event that breaks the
// protocol. A consumer terminates such a message (it will never become
// valid) with the error text as the reason.
var ErrInvalidEvent = errors.New("invalid event")

// Envelope is a CloudEvents 1.0 event in structured JSON mode, as published
// on the event subjects.
//
// Data may hold an access token (auth.rotated): fmt and log/slog print only
// its length.
type Envelope struct {
	// SpecVersion is always SpecVersion.
	SpecVersion string `json:"specversion"`
	// ID is unique per published event.
	ID string `json:"id"`
	// Source names the publisher, such as "authbus/refresher".
	Source string `json:"source"`
	// Type is the event type; it matches the event word of the subject.
	Type Type `json:"type"`
	// Time is when the event was created, in UTC.
	Time time.Time `json:"time"`
	// Subject is the credential key, "tenant.user.server". The NATS subject
	// is authoritative: an event whose Subject differs is refused.
	Subject string `json:"subject"`
	// DataContentType is ContentType or empty.
	DataContentType string `json:"datacontenttype,omitempty"`
	// Data is the payload of Type, a JSON object.
	Data json.RawMessage `json:"data,omitempty"`
}

// Event is a decoded and validated event: its envelope and the payload of its
// type. Exactly one of the payload pointers is set, the one of Type.
//
// An auth.rotated event holds an access token: fmt and log/slog print it
// redacted.
type Event struct {
	Envelope
	// Unauthorized is set when Type is Type401.
	Unauthorized *Unauthorized
	// Expiring is set when Type is TypeExpiring.
	Expiring *Expiring
	// Rotated is set when Type is TypeRotated.
	Rotated *Rotated
	// NeedsReauth is set when Type is TypeNeedsReauth.
	NeedsReauth *NeedsReauth
}

// Payload returns the payload that is set, or nil.
func (e *Event) Payload() Payload {
	switch {
	case e.Unauthorized != nil:
		return *e.Unauthorized
	case e.Expiring != nil:
		return *e.Expiring
	case e.Rotated != nil:
		return *e.Rotated
	case e.NeedsReauth != nil:
		return *e.NeedsReauth
	}
	return nil
}

// Fingerprint returns the fingerprint the payload carries (auth.401,
// auth.expiring, auth.rotated), or "" (auth.needs_reauth).
func (e *Event) Fingerprint() string {
	switch {
	case e.Unauthorized != nil:
		return e.Unauthorized.Fingerprint
	case e.Expiring != nil:
		return e.Expiring.Fingerprint
	case e.Rotated != nil:
		return e.Rotated.Fingerprint
	}
	return ""
}

// Encode returns the structured CloudEvents JSON of p as an event for k from
// source: a new unique id, the current time in UTC, datacontenttype
// ContentType. It refuses (wrapping ErrInvalidEvent, or ErrInvalidKey for
// k) what Decode would refuse: an invalid payload, an empty source, a result
// larger than MaxEventSize.
func Encode(k Key, source string, p Payload) ([]byte, error) {
	if err := k.Validate(); err != nil {
		return nil, also(fmt.Errorf("encoding an event: %w", err), ErrInvalidEvent)
	}
	if p == nil || reflect.ValueOf(p).Kind() == reflect.Pointer && reflect.ValueOf(p).IsNil() {
		return nil, fmt.Errorf("encoding an event for %s: the payload is nil; pass an Unauthorized, Expiring, Rotated or NeedsReauth: %w", k, ErrInvalidEvent)
	}
	t := p.EventType()
	if !t.Valid() {
		return nil, fmt.Errorf("encoding an event for %s: payload type %s is not an event type; pass an Unauthorized, Expiring, Rotated or NeedsReauth: %w", k, quote(string(t)), ErrInvalidEvent)
	}
	if source == "" {
		return nil, fmt.Errorf("encoding a %s event for %s: source is missing; name the publisher, such as \"authbus/refresher\": %w", t, k, ErrInvalidEvent)
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("encoding an event for %s: %w", k, err)
	}
	data, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding a %s event for %s: data: %v: %w", t, k, err, ErrInvalidEvent)
	}
	b, err := json.Marshal(Envelope{
		SpecVersion:     SpecVersion,
		ID:              nuid.Next(), // unique across processes without coordination, and cheap
		Source:          source,
		Type:            t,
		Time:            time.Now().UTC(),
		Subject:         k.String(),
		DataContentType: ContentType,
		Data:            data,
	})
	if err != nil {
		return nil, fmt.Errorf("encoding a %s event for %s: %v: %w", t, k, err, ErrInvalidEvent)
	}
	if len(b) > MaxEventSize {
		return nil, fmt.Errorf("encoding a %s event for %s: it is %d bytes, over MaxEventSize (%d); shorten source or the payload: %w",
			t, k, len(b), MaxEventSize, ErrInvalidEvent)
	}
	return b, nil
}

// Decode validates b as an event received on a subject of type t for key k
// (as returned by Subjects.ParseEvent) and returns it: size ≤ MaxEventSize,
// one JSON object with no repeated or case-variant attribute names,
// specversion "1.0", id and source non-empty, time set, type == t, subject
// attribute == k.String() (the NATS subject is authoritative: a different key
// is an error naming both), datacontenttype empty or application/json, data
// present and valid for t. Unknown attributes (CloudEvents extensions) and
// unknown data fields (from newer publishers) are ignored. Times are returned
// in UTC.
//
// Errors wrap ErrInvalidEvent and name every bad field ("data.fingerprint").
func Decode(t Type, k Key, b []byte) (*Event, error) {
	if !t.Valid() {
		return nil, fmt.Errorf("decoding an event: type %s is not an event type; want auth.401, auth.expiring, auth.rotated or auth.needs_reauth: %w",
			quote(string(t)), ErrInvalidEvent)
	}
	if err := k.Validate(); err != nil {
		return nil, also(fmt.Errorf("decoding a %s event: %w", t, err), ErrInvalidEvent)
	}
	fail := func(ps []problem) error {
		return fmt.Errorf("%s event for %s: %s: %w", t, k, joinProblems(ps), ErrInvalidEvent)
	}
	if len(b) > MaxEventSize {
		return nil, fail([]problem{{"size", fmt.Sprintf("is %d bytes; events are at most %d bytes (MaxEventSize)", len(b), MaxEventSize)}})
	}

	var env Envelope
	if ps := decodeObject("", b, &env, true); len(ps) > 0 {
		return nil, fail(ps)
	}
	env.Time = env.Time.UTC()
	if ps := env.problems(t, k); len(ps) > 0 {
		return nil, fail(ps)
	}

	ev := &Event{Envelope: env}
	var ps []problem
	switch t {
	case Type401:
		ev.Unauthorized, ps = decodeData[Unauthorized](env.Data)
	case TypeExpiring:
		ev.Expiring, ps = decodeData[Expiring](env.Data)
	case TypeRotated:
		ev.Rotated, ps = decodeData[Rotated](env.Data)
	case TypeNeedsReauth:
		ev.NeedsReauth, ps = decodeData[NeedsReauth](env.Data)
	}
	if len(ps) > 0 {
		return nil, fail(ps)
	}
	return ev, nil
}

// problems checks the envelope attributes of an event received for t and k.
func (env *Envelope) problems(t Type, k Key) []problem {
	var ps []problem
	switch env.SpecVersion {
	case SpecVersion:
	case "":
		ps = append(ps, problem{"specversion", `is missing; send "1.0" (CloudEvents 1.0)`})
	default:
		ps = append(ps, problem{"specversion", fmt.Sprintf(`is %s; want "1.0" (CloudEvents 1.0)`, quote(env.SpecVersion))})
	}
	if env.ID == "" {
		ps = append(ps, problem{"id", "is missing; send an id unique to this event"})
	}
	if env.Source == "" {
		ps = append(ps, problem{"source", `is missing; name the publisher, such as "authbus/refresher"`})
	}
	ps = checkTime(ps, "time", env.Time, true)
	switch env.Type {
	case t:
	case "":
		ps = append(ps, problem{"type", fmt.Sprintf("is missing; send %q, the type of the subject's event word", t)})
	default:
		ps = append(ps, problem{"type", fmt.Sprintf("is %s but the event arrived on an %s subject; the type must match the subject's event word", quote(string(env.Type)), t)})
	}
	switch env.Subject {
	case k.String():
	case "":
		ps = append(ps, problem{"subject", fmt.Sprintf("is missing; send the credential key %q", k)})
	default:
		ps = append(ps, problem{"subject", fmt.Sprintf("names the key %s but the event arrived on the subject of key %q; the NATS subject is authoritative, publish each event on its own key's subject",
			quote(env.Subject), k)})
	}
	if env.DataContentType != "" {
		// Media type parameters (charset=utf-8) are allowed: other
		// CloudEvents SDKs add them, and they change nothing for JSON.
		if mt, _, err := mime.ParseMediaType(env.DataContentType); err != nil || mt != ContentType {
			ps = append(ps, problem{"datacontenttype", fmt.Sprintf("is %s; send %q or leave it out", quote(env.DataContentType), ContentType)})
		}
	}
	if len(env.Data) == 0 || isNull(env.Data) {
		ps = append(ps, problem{"data", fmt.Sprintf("is missing; send the %s payload as a JSON object", t)})
	}
	return ps
}

// payloadPtr is a pointer to one of the four payload structs.
type payloadPtr[P any] interface {
	*P
	Payload
	problems() []problem
	normalize()
}

// decodeData decodes and validates the data of an event, naming fields with
// their "data." path.
func decodeData[P any, PP payloadPtr[P]](data json.RawMessage) (*P, []problem) {
	p := new(P)
	if ps := decodeObject("data", data, p, true); len(ps) > 0 {
		return nil, ps
	}
	PP(p).normalize()
	ps := PP(p).problems()
	for i := range ps {
		ps[i].field = joinPath("data", ps[i].field)
	}
	if len(ps) > 0 {
		return nil, ps
	}
	return p, nil
}

// String describes e without its data, which may hold an access token.
func (e Envelope) String() string {
	return fmt.Sprintf("Envelope{type:%s id:%s source:%s subject:%s time:%s data:%d bytes}",
		e.Type, e.ID, e.Source, e.Subject, timeOrNone(e.Time), len(e.Data))
}

// GoString describes e in Go syntax without its data.
func (e Envelope) GoString() string {
	return fmt.Sprintf("events.Envelope{SpecVersion:%q, ID:%q, Source:%q, Type:%q, Time:%q, Subject:%q, DataContentType:%q, Data:REDACTED(%d bytes)}",
		e.SpecVersion, e.ID, e.Source, e.Type, timeOrNone(e.Time), e.Subject, e.DataContentType, len(e.Data))
}

// Format makes every fmt verb print String (%#v: GoString), never the data.
func (e Envelope) Format(f fmt.State, verb rune) { formatRedacted(f, verb, e.String(), e.GoString()) }

// LogValue logs the attributes of e, not its data.
func (e Envelope) LogValue() slog.Value { return slog.GroupValue(e.attrs()...) }

func (e Envelope) attrs() []slog.Attr {
	return []slog.Attr{
		slog.String("type", string(e.Type)),
		slog.String("id", e.ID),
		slog.String("source", e.Source),
		slog.String("subject", e.Subject),
		slog.Time("time", e.Time),
	}
}

// String describes e with its payload, redacting any access token.
func (e Event) String() string {
	return fmt.Sprintf("Event{type:%s id:%s source:%s subject:%s time:%s data:%v}",
		e.Type, e.ID, e.Source, e.Subject, timeOrNone(e.Time), e.payloadText())
}

// GoString describes e in Go syntax, redacting any access token.
func (e Event) GoString() string {
	return fmt.Sprintf("events.Event{Envelope:%#v, Payload:%#v}", e.Envelope, e.Payload())
}

// payloadText formats the payload through its own (redacting) formatting.
func (e Event) payloadText() string {
	if p := e.Payload(); p != nil {
		return fmt.Sprintf("%+v", p)
	}
	return "none"
}

// Format makes every fmt verb print String (%#v: GoString), never the token.
func (e Event) Format(f fmt.State, verb rune) { formatRedacted(f, verb, e.String(), e.GoString()) }

// LogValue logs the attributes of e and its payload, redacting any access
// token.
func (e Event) LogValue() slog.Value {
	attrs := e.Envelope.attrs()
	if p := e.Payload(); p != nil {
		attrs = append(attrs, slog.Any("data", p))
	}
	return slog.GroupValue(attrs...)
}
