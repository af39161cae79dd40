package events

import (
	"errors"
	"fmt"
	"strings"
)

// Type is the CloudEvents type of an authbus event. It is fixed ("auth.401",
// …) whatever the subject prefix, so consumers and Nats-Msg-Id values do not
// depend on deployment configuration.
type Type string

// The four event types.
const (
	// Type401 is published by a runtime whose request with a token got 401.
	Type401 Type = "auth.401"
	// TypeExpiring is published by a runtime, or by the refreshers' own
	// scheduler, when a token expires soon.
	TypeExpiring Type = "auth.expiring"
	// TypeRotated is published by a refresher when a new access token is in
	// force (and to re-announce the current one).
	TypeRotated Type = "auth.rotated"
	// TypeNeedsReauth is published by a refresher when only a person logging
	// in again can repair the credential.
	TypeNeedsReauth Type = "auth.needs_reauth"
)

// eventTypes lists the event types in a fixed order.
var eventTypes = [...]Type{Type401, TypeExpiring, TypeRotated, TypeNeedsReauth}

// Word returns the subject token of t after the prefix: "401", "expiring",
// "rotated" or "needs_reauth".
func (t Type) Word() string { return strings.TrimPrefix(string(t), "auth.") }

// Valid reports whether t is one of the four event types.
func (t Type) Valid() bool {
	for _, et := range eventTypes {
		if t == et {
			return true
		}
	}
	return false
}

// typeOfWord returns the event type whose Word is word.
func typeOfWord(word string) (Type, bool) {
	for _, et := range eventTypes {
		if et.Word() == word {
			return et, true
		}
	}
	return "", false
}

// The subject words of the request/reply services and of the pending
// proactive-refresh schedules.
const (
	wordToken    = "token"
	wordRegister = "register"
	wordSchedule = "proactive"
	wordLegacy   = "schedule"
	wordWork     = "work"
	wordSlow     = "slow"
	wordDue      = "due"
)

// DefaultPrefix is the first subject token of every authbus subject unless
// configured otherwise.
const DefaultPrefix = "auth"

// ErrInvalidSubject is wrapped by every error about a subject or subject
// prefix that authbus cannot use.
var ErrInvalidSubject = errors.New("invalid subject")

// Subjects names the subjects, streams and buckets of one authbus deployment,
// all derived from its subject prefix. The zero value uses DefaultPrefix.
// A Subjects is a small immutable value: copy it freely.
//
// The builders (Event, Token, …) do not validate their Key: pass keys that
// came from NewKey, ParseKey or Parse.
type Subjects struct {
	prefix string
}

// NewSubjects returns the names for prefix, one or more dot-separated tokens
// of [A-Za-z0-9_-] such as "auth" or "acme.auth"; "" means DefaultPrefix.
// An error wraps ErrInvalidSubject.
//
// Stream and bucket names take the prefix in upper case with "." replaced by
// "_", so prefixes that differ only in case or in "." versus "_" share
// streams: do not run two such deployments on one NATS account.
func NewSubjects(prefix string) (Subjects, error) {
	if prefix == "" {
		return Subjects{prefix: DefaultPrefix}, nil
	}
	for i, tok := range strings.Split(prefix, ".") {
		if problem := tokenProblem(tok, 0); problem != "" {
			return Subjects{}, fmt.Errorf("subject prefix %s: token %d %s; a prefix is one or more dot-separated tokens of [A-Za-z0-9_-], such as \"auth\" or \"acme.auth\": %w",
				quote(prefix), i+1, problem, ErrInvalidSubject)
		}
	}
	return Subjects{prefix: prefix}, nil
}

// Prefix returns the subject prefix, DefaultPrefix for the zero value.
func (s Subjects) Prefix() string {
	if s.prefix == "" {
		return DefaultPrefix
	}
	return s.prefix
}

func (s Subjects) subject(word string, k Key) string {
	return s.Prefix() + "." + word + "." + k.String()
}

func (s Subjects) wildcard(word string) string {
	return s.Prefix() + "." + word + ".*.*.*"
}

// Event returns "<prefix>.<word>.<tenant>.<user>.<server>", where events of
// type t for k are published.
func (s Subjects) Event(t Type, k Key) string { return s.subject(t.Word(), k) }

// Token returns "<prefix>.token.<key>", the service that answers with the
// current access token of k.
func (s Subjects) Token(k Key) string { return s.subject(wordToken, k) }

// Register returns "<prefix>.register.<key>", the service that takes fresh
// tokens for k and how to refresh them.
func (s Subjects) Register(k Key) string { return s.subject(wordRegister, k) }

// Schedule returns "<prefix>.proactive.<key>", where the pending proactive
// refresh of k waits in the schedules stream (see SchedulesStream) until it
// fires on Due(TypeExpiring, k).
func (s Subjects) Schedule(k Key) string { return s.subject(wordSchedule, k) }

// LegacySchedule returns "<prefix>.schedule.<key>", where refreshers before
// the schedules stream kept the pending proactive refresh of k: in the
// events stream, firing on Work(TypeExpiring, k). Refreshers no longer
// write it, but count and remove what an earlier version left there.
func (s Subjects) LegacySchedule(k Key) string { return s.subject(wordLegacy, k) }

// Due returns "<prefix>.due.<word>.<tenant>.<user>.<server>", where a
// schedule fires in the schedules stream: the auth.expiring of a proactive
// refresh, waiting for a refresher. Only the server's scheduler writes it.
func (s Subjects) Due(t Type, k Key) string { return s.subject(wordDue+"."+t.Word(), k) }

// Work returns "<prefix>.work.<word>.<tenant>.<user>.<server>", where an
// auth.401 or auth.expiring waits in the events stream for a refresher.
// Only refreshers write these subjects: runtimes publish on Event subjects,
// and the refreshers' intake puts what it took in here (see
// docs/security.md); the schedules fire here too.
func (s Subjects) Work(t Type, k Key) string { return s.subject(wordWork+"."+t.Word(), k) }

// Slow returns "<prefix>.slow.<word>.<tenant>.<user>.<server>": Work for
// the events of a tenant that reports more new events than its rate. The
// refreshers take them only when no Work event waits, so a flood of one
// tenant never delays another's.
func (s Subjects) Slow(t Type, k Key) string { return s.subject(wordSlow+"."+t.Word(), k) }

// WorkWildcard returns "<prefix>.work.<word>.*.*.*", matching the queued
// events of type t for every key.
func (s Subjects) WorkWildcard(t Type) string { return s.wildcard(wordWork + "." + t.Word()) }

// SlowWildcard returns "<prefix>.slow.<word>.*.*.*".
func (s Subjects) SlowWildcard(t Type) string { return s.wildcard(wordSlow + "." + t.Word()) }

// DueWildcard returns "<prefix>.due.<word>.*.*.*".
func (s Subjects) DueWildcard(t Type) string { return s.wildcard(wordDue + "." + t.Word()) }

// ParseWork splits a subject built by Work, Slow or Due. Errors wrap
// ErrInvalidSubject.
func (s Subjects) ParseWork(subject string) (Type, Key, error) {
	for _, lane := range []string{wordWork, wordSlow, wordDue} {
		if rest, ok := strings.CutPrefix(subject, s.Prefix()+"."+lane+"."); ok {
			return s.ParseEvent(s.Prefix() + "." + rest)
		}
	}
	return "", Key{}, fmt.Errorf("subject %s: does not start with %q, %q or %q: %w", quote(subject),
		s.Prefix()+"."+wordWork+".", s.Prefix()+"."+wordSlow+".", s.Prefix()+"."+wordDue+".", ErrInvalidSubject)
}

// EventWildcard returns "<prefix>.<word>.*.*.*", matching events of type t
// for every key.
func (s Subjects) EventWildcard(t Type) string { return s.wildcard(t.Word()) }

// TokenWildcard returns "<prefix>.token.*.*.*", what the token service
// subscribes to.
func (s Subjects) TokenWildcard() string { return s.wildcard(wordToken) }

// RegisterWildcard returns "<prefix>.register.*.*.*", what the register
// service subscribes to.
func (s Subjects) RegisterWildcard() string { return s.wildcard(wordRegister) }

// ScheduleWildcard returns "<prefix>.proactive.*.*.*", the schedule
// subjects the schedules stream captures.
func (s Subjects) ScheduleWildcard() string { return s.wildcard(wordSchedule) }

// LegacyScheduleWildcard returns "<prefix>.schedule.*.*.*", the subjects of
// the schedules an earlier version kept in the events stream (see
// LegacySchedule).
func (s Subjects) LegacyScheduleWildcard() string { return s.wildcard(wordLegacy) }

// Parse splits a subject of the form "<prefix>.<word>.<tenant>.<user>.<server>"
// for any word (event words, "token", "register", "schedule", …). Errors wrap
// ErrInvalidSubject; when the key part is what is wrong they also wrap
// ErrInvalidKey.
func (s Subjects) Parse(subject string) (word string, k Key, err error) {
	const form = "want <prefix>.<word>.<tenant>.<user>.<server>"
	rest, ok := strings.CutPrefix(subject, s.Prefix()+".")
	if !ok {
		return "", Key{}, fmt.Errorf("subject %s: does not start with %q; %s: %w",
			quote(subject), s.Prefix()+".", form, ErrInvalidSubject)
	}
	word, key, ok := strings.Cut(rest, ".")
	if problem := tokenProblem(word, 0); problem != "" {
		return "", Key{}, fmt.Errorf("subject %s: the word after the prefix %s; %s: %w",
			quote(subject), problem, form, ErrInvalidSubject)
	}
	if !ok {
		return "", Key{}, fmt.Errorf("subject %s: has no credential key after %q; %s: %w",
			quote(subject), word, form, ErrInvalidSubject)
	}
	k, err = ParseKey(key)
	if err != nil {
		return "", Key{}, also(fmt.Errorf("subject %s: %w", quote(subject), err), ErrInvalidSubject)
	}
	return word, k, nil
}

// ParseEvent is Parse for event subjects: the word must be one of the four
// event words.
func (s Subjects) ParseEvent(subject string) (Type, Key, error) {
	word, k, err := s.Parse(subject)
	if err != nil {
		return "", Key{}, err
	}
	t, ok := typeOfWord(word)
	if !ok {
		return "", Key{}, fmt.Errorf("subject %s: %s is not an event word; want one of 401, expiring, rotated, needs_reauth: %w",
			quote(subject), quote(word), ErrInvalidSubject)
	}
	return t, k, nil
}

// streamBase is the prefix in upper case with "." → "_", as stream and
// bucket names cannot contain ".".
func (s Subjects) streamBase() string {
	return strings.ToUpper(strings.ReplaceAll(s.Prefix(), ".", "_"))
}

// EventsStream returns the name of the work-queue stream of auth.401 and
// auth.expiring: "AUTH_EVENTS" for the default prefix, "ACME_AUTH_EVENTS"
// for "acme.auth".
func (s Subjects) EventsStream() string { return s.streamBase() + "_EVENTS" }

// SchedulesStream returns the name of the work-queue stream of the pending
// proactive refreshes and the auth.expiring they fire: "AUTH_SCHEDULES" for
// the default prefix. A stream of its own, because a JetStream stream
// stores its writes one after another: with every write synced to disk,
// the schedules kept in the events stream halved what it could take in.
func (s Subjects) SchedulesStream() string { return s.streamBase() + "_SCHEDULES" }

// ReauthStream returns the name of the stream that keeps the last
// auth.needs_reauth per key: "AUTH_REAUTH" for the default prefix.
func (s Subjects) ReauthStream() string { return s.streamBase() + "_REAUTH" }

// CredentialsBucket returns the name of the KV bucket of the credential
// records: "AUTH_CREDENTIALS" for the default prefix.
func (s Subjects) CredentialsBucket() string { return s.streamBase() + "_CREDENTIALS" }

// LeasesBucket returns the name of the KV bucket of the refresh leases:
// "AUTH_LEASES" for the default prefix.
func (s Subjects) LeasesBucket() string { return s.streamBase() + "_LEASES" }

// FailuresBucket returns the name of the KV bucket of the last failed
// refresh of each credential: "AUTH_FAILURES" for the default prefix.
func (s Subjects) FailuresBucket() string { return s.streamBase() + "_FAILURES" }

// BucketName returns the name of a KV bucket of this deployment:
// BucketName("CREDENTIALS") is "AUTH_CREDENTIALS" for the default prefix.
//
// Deprecated: use CredentialsBucket or LeasesBucket, which keep the names
// of the deployment's buckets in one place.
func (s Subjects) BucketName(suffix string) string { return s.streamBase() + "_" + suffix }
