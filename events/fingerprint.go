package events

import (
	"crypto/sha256"
	"encoding/hex"
)

// FingerprintLen is the length of a fingerprint in hex characters.
const FingerprintLen = 16

// Fingerprint returns the first 16 lowercase hex characters of the SHA-256 of
// accessToken. Events, logs and spans carry it instead of the token: it tells
// tokens apart without revealing them.
func Fingerprint(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return hex.EncodeToString(sum[:FingerprintLen/2])
}

// ValidFingerprint reports whether s has the form of a fingerprint: exactly 16
// lowercase hex characters.
func ValidFingerprint(s string) bool {
	if len(s) != FingerprintLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// MsgID returns the Nats-Msg-Id of an inbound event,
// "{type}:{key}:{fingerprint}" such as
// "auth.401:acme.alice.github:0123456789abcdef". The events stream drops a
// second publish with the same id inside its duplicate window, which is what
// collapses a storm of 401s for one token into one refresh. It uses the Type,
// not the subject prefix, as the design fixes.
func MsgID(t Type, k Key, fingerprint string) string {
	return string(t) + ":" + k.String() + ":" + fingerprint
}
