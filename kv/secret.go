package kv

import (
	"fmt"
	"log/slog"
)

const redacted = "[redacted]"

// Secret holds a secret string (a token or client secret) in memory. Every
// way of printing it — String, GoString, any fmt verb, slog and JSON —
// renders "[redacted]", so a Secret that reaches a log line or a span by
// accident leaks nothing. Only Reveal returns the value; call it where the
// secret is sent, nowhere else. A Secret is an immutable value, safe for
// concurrent use.
type Secret string

// Reveal returns the secret value.
func (s Secret) Reveal() string { return string(s) }

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s == "" }

// String returns "[redacted]".
func (s Secret) String() string { return redacted }

// GoString returns "[redacted]", so %#v of a struct holding a Secret does
// not print it either.
func (s Secret) GoString() string { return redacted }

// Format writes "[redacted]" for every verb (%v, %s, %q, %x, %d, ...):
// without it, %x or %q would print the underlying string.
func (s Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redacted)) }

// LogValue makes slog log "[redacted]" whatever the handler.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalJSON encodes "[redacted]": a Secret must never leave the process by
// being marshalled. Stored records and wire replies copy Reveal() into a plain
// string field on purpose.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
