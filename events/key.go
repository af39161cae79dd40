package events

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// ErrInvalidKey is wrapped by every error about a malformed credential key.
var ErrInvalidKey = errors.New("invalid credential key")

// MaxKeyPartLen is the longest tenant, user or server name a key may hold.
const MaxKeyPartLen = 64

// keyRule ends every key error, so that whoever reads one learns the format.
const keyRule = "keys are tenant.user.server, each [A-Za-z0-9_-]{1,64}"

var keyPartNames = [3]string{"tenant", "user", "server"}

// Key identifies one credential: the tenant first, so that NATS permissions on
// subject prefixes keep tenants apart. Each part is 1–64 characters of
// [A-Za-z0-9_-]; parts are NATS subject tokens and KV key parts. The zero Key
// is not valid.
type Key struct {
	Tenant string // the organisation; first, so permissions can match on it
	User   string // whose credential it is
	Server string // the resource it is for: an MCP server, an API provider
}

// NewKey returns the key of the given parts, or an error wrapping
// ErrInvalidKey that names the bad part.
func NewKey(tenant, user, server string) (Key, error) {
	k := Key{Tenant: tenant, User: user, Server: server}
	if err := k.Validate(); err != nil {
		return Key{}, err
	}
	return k, nil
}

// ParseKey parses "tenant.user.server", the form returned by Key.String. An
// error wraps ErrInvalidKey and says which part is wrong.
func ParseKey(s string) (Key, error) {
	// Count instead of strings.Split: a hostile input of many dots must not
	// cost an allocation per dot.
	if n := strings.Count(s, ".") + 1; n != 3 {
		return Key{}, fmt.Errorf("credential key %s: has %d parts, want 3; %s: %w",
			quote(s), n, keyRule, ErrInvalidKey)
	}
	tenant, rest, _ := strings.Cut(s, ".")
	user, server, _ := strings.Cut(rest, ".")
	return NewKey(tenant, user, server)
}

// Validate reports whether every part of k is well formed. The error wraps
// ErrInvalidKey and names the first bad part.
func (k Key) Validate() error {
	for i, p := range [3]string{k.Tenant, k.User, k.Server} {
		if problem := tokenProblem(p, MaxKeyPartLen); problem != "" {
			return fmt.Errorf("credential key %s: %s (part %d) %s; %s: %w",
				quote(k.String()), keyPartNames[i], i+1, problem, keyRule, ErrInvalidKey)
		}
	}
	return nil
}

// String returns "tenant.user.server", the form used in subjects, KV keys and
// the CloudEvents subject attribute.
func (k Key) String() string { return k.Tenant + "." + k.User + "." + k.Server }

// MarshalText returns k.String(), so that keys appear as "tenant.user.server"
// in JSON and in slog output. It does not validate: logging a bad key must
// still show it.
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText parses text with ParseKey.
func (k *Key) UnmarshalText(text []byte) error {
	parsed, err := ParseKey(string(text))
	if err != nil {
		return err
	}
	*k = parsed
	return nil
}

// tokenProblem describes what is wrong with a NATS subject token made of
// [A-Za-z0-9_-] (a key part, a subject word, a prefix token), or returns ""
// when it is fine. maxLen 0 means no limit.
func tokenProblem(p string, maxLen int) string {
	if p == "" {
		return "is empty"
	}
	if maxLen > 0 && len(p) > maxLen {
		return fmt.Sprintf("is %d characters long, at most %d allowed", len(p), maxLen)
	}
	for i := 0; i < len(p); i++ {
		if !isTokenChar(p[i]) {
			r, _ := utf8.DecodeRuneInString(p[i:])
			if r == utf8.RuneError {
				return fmt.Sprintf("has the byte %#x (not UTF-8) at offset %d", p[i], i)
			}
			return fmt.Sprintf("has the character %q at offset %d", r, i)
		}
	}
	return ""
}

func isTokenChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}
