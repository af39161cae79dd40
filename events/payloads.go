package events

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits on payload fields. They keep every event under MaxEventSize.
const (
	// MaxRuntimeLen is the longest Unauthorized.Runtime, in bytes.
	MaxRuntimeLen = 256
	// MaxURLLen is the longest Unauthorized.URL, in bytes; truncate longer ones.
	MaxURLLen = 2048
	// MaxAccessTokenSize is the longest access token authbus keeps, in bytes,
	// so that the auth.rotated event announcing it fits in MaxEventSize.
	MaxAccessTokenSize = 12 << 10
	// maxTokenTypeLen bounds token_type, which is a short word ("Bearer").
	maxTokenTypeLen = 128
	// MaxReasonLen and MaxErrorDescriptionLen bound, in bytes, the reason
	// and error_description refreshers announce in auth.needs_reauth (and
	// in auth.token error replies). Both come from the authorization
	// server, which may send anything: TruncateText them to these lengths,
	// and the event fits MaxEventSize whatever the characters (JSON may
	// write each byte as six).
	MaxReasonLen           = 128
	MaxErrorDescriptionLen = 2048
)

// TruncateText makes text from outside (an authorization server's error
// description, a value it echoed) safe to announce and log in at most
// maxLen bytes: invalid UTF-8 becomes U+FFFD, control characters and line or
// paragraph separators become spaces (they would break a header or a log
// line), and a longer text is cut at a character boundary and ends in "…".
// maxLen below 3 is treated as 3.
func TruncateText(text string, maxLen int) string {
	maxLen = max(maxLen, len("…"))
	clean := strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(text, "\uFFFD"))
	if len(clean) <= maxLen {
		return clean
	}
	cut := maxLen - len("…")
	for cut > 0 && !utf8.RuneStart(clean[cut]) {
		cut--
	}
	return clean[:cut] + "…"
}

// Payload is the data of one of the four events: Unauthorized, Expiring,
// Rotated or NeedsReauth (values or pointers). Encode takes any of them.
type Payload interface {
	// EventType returns the event type this payload belongs to.
	EventType() Type
	// Validate returns an error wrapping ErrInvalidEvent that names every
	// field that breaks the protocol, or nil.
	Validate() error
}

// Unauthorized is the data of an auth.401 event: a runtime's request with the
// token of this fingerprint got 401.
type Unauthorized struct {
	// Fingerprint of the access token that was refused (required).
	Fingerprint string `json:"fingerprint"`
	// Runtime names who saw the 401, such as "mcp-client/host-3" (required,
	// at most MaxRuntimeLen bytes).
	Runtime string `json:"runtime"`
	// Status is the HTTP status seen, 100–599; 0 means not given.
	Status int `json:"status,omitempty"`
	// URL that answered 401, at most MaxURLLen bytes. Strip query parameters
	// that may hold secrets before publishing.
	URL string `json:"url,omitempty"`
	// ObservedAt is when the 401 was seen; zero means not given.
	ObservedAt time.Time `json:"observed_at,omitzero"`
}

// Expiring is the data of an auth.expiring event: the token of this
// fingerprint expires soon.
type Expiring struct {
	// Fingerprint of the access token that expires (required).
	Fingerprint string `json:"fingerprint"`
	// ExpiresAt is when it expires (required).
	ExpiresAt time.Time `json:"expires_at"`
}

// Rotated is the data of an auth.rotated event and the body of a successful
// auth.token reply: the access token now in force.
//
// It holds a live access token: fmt and log/slog print only its fingerprint,
// version and expiry (log it directly, not inside another struct; see the
// package doc). MarshalJSON writes the token: it is the wire form.
type Rotated struct {
	// AccessToken is the token itself (required, printable ASCII, at most
	// MaxAccessTokenSize bytes).
	AccessToken string `json:"access_token"`
	// TokenType is the scheme of the Authorization header, such as "Bearer"
	// (required).
	TokenType string `json:"token_type"`
	// ExpiresAt is when the token expires; zero means it does not.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Fingerprint must equal Fingerprint(AccessToken).
	Fingerprint string `json:"fingerprint"`
	// Version grows by one with every rotation and registration of the
	// credential (≥ 1); subscribers ignore versions they already have.
	Version int64 `json:"version"`
}

// NeedsReauth is the data of an auth.needs_reauth event: refresh is
// impossible until a person logs in again.
type NeedsReauth struct {
	// Reason is the OAuth error code of the token endpoint ("invalid_grant",
	// "invalid_client", …) or authbus's own ("no_refresh_token", …) (required).
	Reason string `json:"reason"`
	// ErrorDescription is the token endpoint's error_description, as given.
	ErrorDescription string `json:"error_description,omitempty"`
	// Version is the version of the credential generation that failed (≥ 1).
	Version int64 `json:"version"`
}

// EventType returns Type401.
func (Unauthorized) EventType() Type { return Type401 }

// EventType returns TypeExpiring.
func (Expiring) EventType() Type { return TypeExpiring }

// EventType returns TypeRotated.
func (Rotated) EventType() Type { return TypeRotated }

// EventType returns TypeNeedsReauth.
func (NeedsReauth) EventType() Type { return TypeNeedsReauth }

// Validate reports every field of p that breaks the protocol.
func (p Unauthorized) Validate() error { return payloadErr(Type401, p.problems()) }

func (p Unauthorized) problems() []problem {
	var ps []problem
	ps = checkFingerprint(ps, p.Fingerprint)
	switch {
	case p.Runtime == "":
		ps = append(ps, problem{"runtime", "is missing; name the runtime that saw the 401"})
	case len(p.Runtime) > MaxRuntimeLen:
		ps = append(ps, problem{"runtime", fmt.Sprintf("is %d bytes; at most %d allowed", len(p.Runtime), MaxRuntimeLen)})
	}
	if p.Status != 0 && (p.Status < 100 || p.Status > 599) {
		ps = append(ps, problem{"status", fmt.Sprintf("is %d; send an HTTP status 100–599, or leave it out", p.Status)})
	}
	if len(p.URL) > MaxURLLen {
		ps = append(ps, problem{"url", fmt.Sprintf("is %d bytes; at most %d allowed, truncate it", len(p.URL), MaxURLLen)})
	}
	ps = checkTime(ps, "observed_at", p.ObservedAt, false)
	return ps
}

// Validate reports every field of p that breaks the protocol.
func (p Expiring) Validate() error { return payloadErr(TypeExpiring, p.problems()) }

func (p Expiring) problems() []problem {
	var ps []problem
	ps = checkFingerprint(ps, p.Fingerprint)
	ps = checkTime(ps, "expires_at", p.ExpiresAt, true)
	return ps
}

// Validate reports every field of p that breaks the protocol.
func (p Rotated) Validate() error { return payloadErr(TypeRotated, p.problems()) }

func (p Rotated) problems() []problem {
	var ps []problem
	ps = checkAccessToken(ps, "access_token", p.AccessToken)
	ps = checkTokenType(ps, "token_type", p.TokenType, true)
	ps = checkTime(ps, "expires_at", p.ExpiresAt, false)
	n := len(ps)
	ps = checkFingerprint(ps, p.Fingerprint)
	if len(ps) == n && p.AccessToken != "" && p.Fingerprint != Fingerprint(p.AccessToken) {
		ps = append(ps, problem{"fingerprint", "does not match access_token; set it to Fingerprint(access_token)"})
	}
	ps = checkVersion(ps, p.Version)
	return ps
}

// Validate reports every field of p that breaks the protocol.
func (p NeedsReauth) Validate() error { return payloadErr(TypeNeedsReauth, p.problems()) }

func (p NeedsReauth) problems() []problem {
	var ps []problem
	if p.Reason == "" {
		ps = append(ps, problem{"reason", `is missing; send the token endpoint's OAuth error code, such as "invalid_grant"`})
	}
	ps = checkVersion(ps, p.Version)
	return ps
}

// The MarshalJSON methods put times on the wire in UTC, as the protocol
// requires, whatever location the caller's time.Time carries.

// MarshalJSON encodes p with its time in UTC.
func (p Unauthorized) MarshalJSON() ([]byte, error) {
	type wire Unauthorized // without methods, so no recursion
	w := wire(p)
	w.ObservedAt = w.ObservedAt.UTC()
	return json.Marshal(w)
}

// MarshalJSON encodes p with its time in UTC.
func (p Expiring) MarshalJSON() ([]byte, error) {
	type wire Expiring
	w := wire(p)
	w.ExpiresAt = w.ExpiresAt.UTC()
	return json.Marshal(w)
}

// MarshalJSON encodes p, access token included, with its time in UTC.
func (p Rotated) MarshalJSON() ([]byte, error) {
	type wire Rotated
	w := wire(p)
	w.ExpiresAt = w.ExpiresAt.UTC()
	return json.Marshal(w)
}

// normalize puts decoded times in UTC, so that a decoded value equals its
// re-encoded and decoded self.
func (p *Unauthorized) normalize() { p.ObservedAt = p.ObservedAt.UTC() }
func (p *Expiring) normalize()     { p.ExpiresAt = p.ExpiresAt.UTC() }
func (p *Rotated) normalize()      { p.ExpiresAt = p.ExpiresAt.UTC() }
func (p *NeedsReauth) normalize()  {}

// String describes p without its access token.
func (p Rotated) String() string {
	return fmt.Sprintf("Rotated{access_token:REDACTED fingerprint:%s version:%d expires_at:%s}",
		p.Fingerprint, p.Version, timeOrNone(p.ExpiresAt))
}

// GoString describes p in Go syntax without its access token.
func (p Rotated) GoString() string {
	return fmt.Sprintf("events.Rotated{AccessToken:\"REDACTED\", Fingerprint:%q, Version:%d, ExpiresAt:%q}",
		p.Fingerprint, p.Version, timeOrNone(p.ExpiresAt))
}

// Format makes every fmt verb print String (%#v: GoString), never the token.
func (p Rotated) Format(f fmt.State, verb rune) { formatRedacted(f, verb, p.String(), p.GoString()) }

// LogValue logs p as its fingerprint, version and expiry, never the token.
func (p Rotated) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("fingerprint", p.Fingerprint), slog.Int64("version", p.Version)}
	if !p.ExpiresAt.IsZero() {
		attrs = append(attrs, slog.Time("expires_at", p.ExpiresAt))
	}
	return slog.GroupValue(attrs...)
}

func timeOrNone(t time.Time) string {
	if t.IsZero() {
		return "none"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func payloadErr(t Type, ps []problem) error {
	if len(ps) == 0 {
		return nil
	}
	return fmt.Errorf("%s data: %s: %w", t, joinProblems(ps), ErrInvalidEvent)
}

// maxProblems bounds how many problems one error lists: enough to fix a
// request in one go, not so many that a hostile body makes a huge error or
// costs much work. Checks may stop once they have more than maxProblems.
const maxProblems = 10

func joinProblems(ps []problem) string {
	var msgs []string
	for i, p := range ps {
		if i == maxProblems {
			msgs = append(msgs, "and more")
			break
		}
		msgs = append(msgs, p.String())
	}
	return strings.Join(msgs, "; ")
}

func checkFingerprint(ps []problem, fp string) []problem {
	switch {
	case fp == "":
		return append(ps, problem{"fingerprint", "is missing; send Fingerprint(access token) of the token in question"})
	case !ValidFingerprint(fp):
		// Not repeated in the message: a confused publisher may have sent
		// the token itself.
		return append(ps, problem{"fingerprint", fmt.Sprintf("is %d bytes but not 16 lowercase hex characters; send Fingerprint(access token), never the token", len(fp))})
	}
	return ps
}

func checkVersion(ps []problem, v int64) []problem {
	if v < 1 {
		return append(ps, problem{"version", fmt.Sprintf("is %d; versions start at 1", v)})
	}
	return ps
}

// checkTime refuses times that cannot be written as RFC 3339 once in UTC
// (encoding/json fails on years outside 0–9999), and a missing required time.
func checkTime(ps []problem, field string, t time.Time, required bool) []problem {
	if t.IsZero() {
		if required {
			return append(ps, problem{field, `is missing; send an RFC 3339 time in UTC such as "2025-06-01T12:00:00Z"`})
		}
		return ps
	}
	if y := t.UTC().Year(); y < 1 || y > 9999 {
		return append(ps, problem{field, fmt.Sprintf("is in the year %d; send a time between the years 1 and 9999", y)})
	}
	return ps
}

// checkAccessToken requires a token of printable ASCII (RFC 6749 VSCHAR): it
// goes into an Authorization header, where a line break would inject headers.
// The token itself never appears in the message.
func checkAccessToken(ps []problem, field, tok string) []problem {
	switch {
	case tok == "":
		return append(ps, problem{field, "is missing; send the access token"})
	case len(tok) > MaxAccessTokenSize:
		return append(ps, problem{field, fmt.Sprintf("is %d bytes; authbus keeps tokens of at most %d bytes", len(tok), MaxAccessTokenSize)})
	case !printableASCII(tok):
		return append(ps, problem{field, "has characters outside printable ASCII (RFC 6749 VSCHAR)"})
	}
	return ps
}

// checkTokenType requires a short word without spaces ("Bearer", "DPoP",
// "bearer" from Dex): it is the scheme of an Authorization header.
func checkTokenType(ps []problem, field, tt string, required bool) []problem {
	switch {
	case tt == "":
		if required {
			return append(ps, problem{field, `is missing; send the token type, such as "Bearer"`})
		}
	case len(tt) > maxTokenTypeLen:
		return append(ps, problem{field, fmt.Sprintf("is %d bytes; at most %d allowed", len(tt), maxTokenTypeLen)})
	case !printableASCII(tt) || strings.Contains(tt, " "):
		return append(ps, problem{field, fmt.Sprintf(`is %s; send a single word such as "Bearer"`, quote(tt))})
	}
	return ps
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
