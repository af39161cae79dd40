package kv

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// keySize is the length of an AES-256 key; nonceSize the length of a GCM
// nonce. A random 96-bit nonce is safe for far more seals than one key will
// ever see here (one per refresh).
const (
	keySize   = 32
	nonceSize = 12
)

// Sealed is a value encrypted with AES-256-GCM under the key named KeyID.
// The additional authenticated data is not stored: the caller supplies it
// again to Open, so a blob copied elsewhere does not open (the store binds
// the credential key, the field and the record schema; see sealAD). Sealed is a plain value, its JSON form what is stored; do
// not modify one that another goroutine reads.
type Sealed struct {
	KeyID      string `json:"kid"`
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ct"`
}

// KeyRing holds the seal keys by id, one of them active. New values are
// sealed with the active key; values sealed with any key of the ring open, so
// the key can be rotated by adding a new active key and keeping the old ones
// until every record has been rewritten. Build one with NewKeyRing or
// LoadOrCreateKeyRing; it is immutable once built and safe for concurrent
// use.
type KeyRing struct {
	active string
	aeads  map[string]cipher.AEAD // the standard GCM is stateless, so shared
}

// NewKeyRing builds a ring from 32-byte keys by id; active names the key new
// values are sealed with. The key bytes are copied. Errors wrap ErrSealKey.
func NewKeyRing(active string, keys map[string][]byte) (*KeyRing, error) {
	var problems []error
	if active == "" {
		problems = append(problems, errors.New("no active key id; set \"active\" to one of the key ids"))
	} else if _, ok := keys[active]; !ok {
		problems = append(problems, fmt.Errorf("active key %q is not among the keys (%s)", active, idList(keys)))
	}
	if len(keys) == 0 {
		problems = append(problems, errors.New("no keys"))
	}
	r := &KeyRing{active: active, aeads: make(map[string]cipher.AEAD, len(keys))}
	for _, id := range slices.Sorted(maps.Keys(keys)) {
		k := keys[id]
		if id == "" || strings.TrimSpace(id) != id {
			problems = append(problems, fmt.Errorf("key id %q is empty or has surrounding spaces", id))
			continue
		}
		if len(k) != keySize {
			problems = append(problems, fmt.Errorf("key %q is %d bytes, want %d (AES-256)", id, len(k), keySize))
			continue
		}
		block, err := aes.NewCipher(slices.Clone(k))
		if err != nil {
			problems = append(problems, fmt.Errorf("key %q: %w", id, err))
			continue
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			problems = append(problems, fmt.Errorf("key %q: %w", id, err))
			continue
		}
		r.aeads[id] = aead
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w: key ring: %w", ErrSealKey, errors.Join(problems...))
	}
	return r, nil
}

// ActiveID returns the id of the key new values are sealed with.
func (r *KeyRing) ActiveID() string { return r.active }

// Seal encrypts plaintext with the active key and a fresh random nonce,
// binding it to aad.
func (r *KeyRing) Seal(plaintext, aad []byte) (Sealed, error) {
	nonce := make([]byte, nonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return Sealed{}, fmt.Errorf("seal: random nonce: %w", err)
	}
	return Sealed{
		KeyID:      r.active,
		Nonce:      nonce,
		Ciphertext: r.aeads[r.active].Seal(nil, nonce, plaintext, aad),
	}, nil
}

// Open decrypts s with the key it names. An unknown key id is an error
// wrapping ErrSealKey (the key file lacks a key); a value that fails
// authentication — tampered, sealed for another aad, or a different key
// under the same id — wraps ErrUnseal.
func (r *KeyRing) Open(s Sealed, aad []byte) ([]byte, error) {
	aead, ok := r.aeads[s.KeyID]
	if !ok {
		return nil, fmt.Errorf("%w: value sealed with key %q, which the key ring does not hold (it has %s); add that key to the key file",
			ErrSealKey, s.KeyID, idList(r.aeads))
	}
	// GCM panics on a nonce of the wrong size; stored data must not crash us.
	if len(s.Nonce) != aead.NonceSize() {
		return nil, fmt.Errorf("%w: nonce is %d bytes, want %d", ErrUnseal, len(s.Nonce), aead.NonceSize())
	}
	pt, err := aead.Open(nil, s.Nonce, s.Ciphertext, aad)
	if err != nil {
		return nil, fmt.Errorf("%w: key %q: tampered, sealed for another credential, or the key under this id changed", ErrUnseal, s.KeyID)
	}
	return pt, nil
}

// keyFile is the JSON form of a key ring on disk.
type keyFile struct {
	Active string            `json:"active"`
	Keys   map[string]string `json:"keys"` // id → base64 (standard encoding) of 32 bytes
}

// LoadOrCreateKeyRing reads the key file at path, or creates it with one
// random key when it does not exist (created reports which). The file is JSON
// {"active":"<id>","keys":{"<id>":"<base64 of 32 bytes>"}}; a new file gets
// mode 0600 in a directory created with mode 0700. A file that group or
// others may access is refused, as is a malformed one; every error wraps
// ErrSealKey and says what to do. Safe to call from several processes at
// once: the file appears atomically and an existing file is never replaced.
func LoadOrCreateKeyRing(path string) (ring *KeyRing, created bool, err error) {
	ring, err = loadKeyRing(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return ring, false, err
	}
	created, err = createKeyFile(path)
	if err != nil {
		return nil, false, err
	}
	// Read back what is on disk: when another process won the race to
	// create the file, its key is the one to use.
	ring, err = loadKeyRing(path)
	return ring, created && err == nil, err
}

// LoadKeyRing reads the key file at path without creating it: a missing
// file is an error wrapping fs.ErrNotExist, so that a command can check
// the file before it knows that it can run, and create it only then (with
// LoadOrCreateKeyRing). Other errors are LoadOrCreateKeyRing's.
func LoadKeyRing(path string) (*KeyRing, error) {
	ring, err := loadKeyRing(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("seal key file %s: %w", path, err)
	}
	return ring, err
}

func loadKeyRing(path string) (*KeyRing, error) {
	kf, err := readKeyFile(path)
	if err != nil {
		return nil, err
	}
	return kf.ring(path)
}

// readKeyFile reads and checks the key file at path: a regular file that
// only its owner may access, of the JSON form of keyFile. A missing file is
// fs.ErrNotExist unwrapped; every other error wraps ErrSealKey.
func readKeyFile(path string) (keyFile, error) {
	var kf keyFile
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return kf, err
		}
		return kf, fmt.Errorf("%w: open key file: %w", ErrSealKey, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return kf, fmt.Errorf("%w: key file %s: %w", ErrSealKey, path, err)
	}
	if !fi.Mode().IsRegular() {
		return kf, fmt.Errorf("%w: key file %s is not a regular file", ErrSealKey, path)
	}
	// The file holds the keys to every refresh token: nobody but its owner
	// may read it, and nobody but its owner may swap in a key of theirs.
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return kf, fmt.Errorf("%w: key file %s has mode %04o, open to group or others; run: chmod 600 %s",
			ErrSealKey, path, perm, path)
	}
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kf); err != nil {
		return kf, fmt.Errorf(`%w: key file %s is not valid JSON of the form {"active":"<id>","keys":{"<id>":"<base64 of 32 bytes>"}}: %w`,
			ErrSealKey, path, err)
	}
	return kf, nil
}

// ring builds the key ring the file describes; path is for messages.
func (kf keyFile) ring(path string) (*KeyRing, error) {
	keys := make(map[string][]byte, len(kf.Keys))
	for id, b64 := range kf.Keys {
		k, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("%w: key file %s: key %q is not standard base64: %w", ErrSealKey, path, id, err)
		}
		keys[id] = k
	}
	ring, err := NewKeyRing(kf.Active, keys)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return ring, nil
}

// createKeyFile writes a new key file at path unless one exists. It writes a
// temporary file and hard-links it into place, which fails if path exists:
// a concurrent reader never sees a half-written file, and two processes
// starting together never overwrite each other's key.
func createKeyFile(path string) (created bool, err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("%w: create key directory: %w", ErrSealKey, err)
	}
	key := make([]byte, keySize)
	if _, err := rand.Read(key); err != nil {
		return false, fmt.Errorf("%w: random key: %w", ErrSealKey, err)
	}
	id := "k1-" + time.Now().UTC().Format("20060102")
	data, err := json.MarshalIndent(keyFile{Active: id, Keys: map[string]string{id: base64.StdEncoding.EncodeToString(key)}}, "", "  ")
	if err != nil {
		return false, fmt.Errorf("%w: encode key file: %w", ErrSealKey, err)
	}
	data = append(data, '\n')

	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return false, fmt.Errorf("%w: create key file: %w", ErrSealKey, err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp already uses 0600; Chmod states it and survives a changed default.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return false, fmt.Errorf("%w: create key file: %w", ErrSealKey, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, fmt.Errorf("%w: write key file: %w", ErrSealKey, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return false, fmt.Errorf("%w: write key file: %w", ErrSealKey, err)
	}
	if err := tmp.Close(); err != nil {
		return false, fmt.Errorf("%w: write key file: %w", ErrSealKey, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return false, nil
		}
		return false, fmt.Errorf("%w: create key file %s: %w", ErrSealKey, path, err)
	}
	// Make the new directory entry durable: losing the key loses every
	// sealed refresh token.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return true, nil
}

func idList[V any](m map[string]V) string {
	ids := slices.Sorted(maps.Keys(m))
	if len(ids) == 0 {
		return "none"
	}
	return `"` + strings.Join(ids, `", "`) + `"`
}
