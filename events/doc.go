// Package events is the authbus wire protocol: credential keys, NATS subject,
// stream and bucket names, the CloudEvents envelope of the four events
// (auth.401, auth.expiring, auth.rotated, auth.needs_reauth) and their
// payloads, the bare JSON bodies of auth.register and auth.token, error
// replies, token fingerprints and de-duplication ids.
//
// It builds and checks bytes and names, and knows nothing of NATS connections,
// so that the refresher, the publisher CLI and every runtime's client library
// share one definition of the contract. docs/protocol.md is the normative
// description; this package is its executable form.
//
// Everything that arrives from the wire goes through a decoder here (Decode,
// DecodeRegisterRequest, Subjects.Parse, ParseKey). The decoders never panic on
// any input; they refuse bad input with a single-line error that wraps
// ErrInvalidEvent, ErrInvalidRequest, ErrInvalidSubject or ErrInvalidKey,
// names the offending field and says what to send instead, so a consumer can
// terminate a bad message with the error text as its reason. Field names are
// matched exactly (JSON is case-sensitive here, unlike encoding/json) and a
// field that appears twice is refused, so that every language reads a message
// the same way.
//
// Values that hold tokens or secrets (Rotated, RegisterToken,
// RegisterRequest, Envelope, Event) redact them when formatted with fmt or
// logged with log/slog: refresh tokens and client secrets must never reach a
// log line. Log such a value itself (slog.Any("token", r)), not a struct or
// slice that holds it: slog's JSON handler encodes nested values with
// encoding/json, which writes the wire form, secrets included.
//
// All functions and methods are safe for concurrent use.
package events
