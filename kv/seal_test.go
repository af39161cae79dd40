package kv

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestSealOpen(t *testing.T) {
	t.Parallel()
	ring := testRing(t)
	aad := []byte("acme.alice.github")
	s, err := ring.Seal([]byte("rt-secret"), aad)
	if err != nil {
		t.Fatal(err)
	}
	if s.KeyID != ring.ActiveID() || len(s.Nonce) != nonceSize || bytes.Contains(s.Ciphertext, []byte("rt-secret")) {
		t.Fatalf("sealed = %+v", s)
	}
	s2, _ := ring.Seal([]byte("rt-secret"), aad)
	if bytes.Equal(s.Nonce, s2.Nonce) {
		t.Fatal("two seals share a nonce")
	}

	t.Run("round trip", func(t *testing.T) {
		pt, err := ring.Open(s, aad)
		if err != nil || string(pt) != "rt-secret" {
			t.Fatalf("Open = %q, %v", pt, err)
		}
	})
	t.Run("wrong aad", func(t *testing.T) {
		_, err := ring.Open(s, []byte("acme.mallory.github"))
		if !errors.Is(err, ErrUnseal) {
			t.Fatalf("Open with another credential's aad: %v, want ErrUnseal", err)
		}
	})
	t.Run("tampered ciphertext", func(t *testing.T) {
		bad := s
		bad.Ciphertext = bytes.Clone(s.Ciphertext)
		bad.Ciphertext[0] ^= 1
		if _, err := ring.Open(bad, aad); !errors.Is(err, ErrUnseal) {
			t.Fatalf("Open tampered: %v, want ErrUnseal", err)
		}
	})
	t.Run("bad nonce", func(t *testing.T) {
		bad := s
		bad.Nonce = s.Nonce[:4] // GCM would panic on this
		if _, err := ring.Open(bad, aad); !errors.Is(err, ErrUnseal) {
			t.Fatalf("Open with short nonce: %v, want ErrUnseal", err)
		}
	})
	t.Run("unknown kid", func(t *testing.T) {
		bad := s
		bad.KeyID = "k9-gone"
		_, err := ring.Open(bad, aad)
		if !errors.Is(err, ErrSealKey) || !strings.Contains(err.Error(), `"k9-gone"`) {
			t.Fatalf("Open with unknown kid: %v, want ErrSealKey naming the kid", err)
		}
	})
	t.Run("same kid, other key", func(t *testing.T) {
		other := testRing(t)
		if _, err := other.Open(s, aad); !errors.Is(err, ErrUnseal) {
			t.Fatalf("Open under another key with the same id: %v, want ErrUnseal", err)
		}
	})
}

func TestKeyRotation(t *testing.T) {
	t.Parallel()
	k1, k2 := randomKey(t), randomKey(t)
	old, err := NewKeyRing("k1", map[string][]byte{"k1": k1})
	if err != nil {
		t.Fatal(err)
	}
	sealed, _ := old.Seal([]byte("v"), nil)
	rotated, err := NewKeyRing("k2", map[string][]byte{"k1": k1, "k2": k2})
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := rotated.Open(sealed, nil); err != nil || string(pt) != "v" {
		t.Fatalf("rotated ring opens old value: %q, %v", pt, err)
	}
	if s, _ := rotated.Seal([]byte("v"), nil); s.KeyID != "k2" {
		t.Fatalf("rotated ring seals with %q, want k2", s.KeyID)
	}
}

func TestNewKeyRingRefuses(t *testing.T) {
	t.Parallel()
	good := randomKey(t)
	for _, tc := range []struct {
		name   string
		active string
		keys   map[string][]byte
		want   string
	}{
		{"no active", "", map[string][]byte{"k1": good}, "no active key id"},
		{"active missing", "k2", map[string][]byte{"k1": good}, `active key "k2" is not among the keys ("k1")`},
		{"short key", "k1", map[string][]byte{"k1": good[:16]}, `key "k1" is 16 bytes, want 32`},
		{"no keys", "k1", nil, "no keys"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewKeyRing(tc.active, tc.keys)
			if !errors.Is(err, ErrSealKey) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewKeyRing: %v; want ErrSealKey saying %q", err, tc.want)
			}
		})
	}
}

func TestLoadOrCreateKeyRing(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data")
	path := filepath.Join(dir, "seal.json")

	ring, created, err := LoadOrCreateKeyRing(path)
	if err != nil || !created {
		t.Fatalf("first load: created=%v err=%v", created, err)
	}
	if !strings.HasPrefix(ring.ActiveID(), "k1-") || len(ring.ActiveID()) != len("k1-20261123") {
		t.Fatalf("active id %q, want k1-YYYYMMDD", ring.ActiveID())
	}
	assertMode(t, path, 0o600)
	assertMode(t, dir, 0o700|os.ModeDir)
	if tmp, _ := filepath.Glob(filepath.Join(dir, ".*")); len(tmp) != 0 {
		t.Fatalf("temporary files left behind: %v", tmp)
	}

	sealed, _ := ring.Seal([]byte("refresh"), []byte("k"))
	again, created, err := LoadOrCreateKeyRing(path)
	if err != nil || created {
		t.Fatalf("second load: created=%v err=%v", created, err)
	}
	if pt, err := again.Open(sealed, []byte("k")); err != nil || string(pt) != "refresh" {
		t.Fatalf("second load does not open what the first sealed: %q, %v", pt, err)
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = LoadOrCreateKeyRing(path)
	if !errors.Is(err, ErrSealKey) || !strings.Contains(err.Error(), "chmod 600 "+path) {
		t.Fatalf("load at 0644: %v; want ErrSealKey telling to chmod 600", err)
	}
}

func TestLoadOrCreateKeyRingConcurrent(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "seal.json")
	const n = 8
	rings := make([]*KeyRing, n)
	var createdCount int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ring, created, err := LoadOrCreateKeyRing(path)
			if err != nil {
				t.Errorf("load %d: %v", i, err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			rings[i] = ring
			if created {
				createdCount++
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if createdCount != 1 {
		t.Fatalf("%d loads report creating the file, want 1", createdCount)
	}
	sealed, _ := rings[0].Seal([]byte("x"), nil)
	for i, r := range rings {
		if _, err := r.Open(sealed, nil); err != nil {
			t.Fatalf("ring %d does not hold ring 0's key: %v", i, err)
		}
	}
}

func TestLoadKeyRingMalformed(t *testing.T) {
	t.Parallel()
	good := base64.StdEncoding.EncodeToString(randomKey(t))
	for _, tc := range []struct {
		name, content, want string
	}{
		{"not json", "k1=abc", "not valid JSON"},
		{"empty", "", "not valid JSON"},
		{"unknown field", `{"active":"k1","keys":{"k1":"` + good + `"},"extra":1}`, "not valid JSON"},
		{"bad base64", `{"active":"k1","keys":{"k1":"***"}}`, `key "k1" is not standard base64`},
		{"short key", `{"active":"k1","keys":{"k1":"` + base64.StdEncoding.EncodeToString([]byte("short")) + `"}}`, `key "k1" is 5 bytes`},
		{"active missing", `{"active":"k2","keys":{"k1":"` + good + `"}}`, `active key "k2"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "seal.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, created, err := LoadOrCreateKeyRing(path)
			if created || !errors.Is(err, ErrSealKey) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("load: created=%v err=%v; want ErrSealKey saying %q", created, err, tc.want)
			}
			if b, _ := os.ReadFile(path); string(b) != tc.content {
				t.Fatal("a malformed key file was overwritten")
			}
		})
	}
}

func TestKeyFileFormat(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "seal.json")
	ring, _, err := LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var kf struct {
		Active string            `json:"active"`
		Keys   map[string]string `json:"keys"`
	}
	if err := json.Unmarshal(b, &kf); err != nil {
		t.Fatal(err)
	}
	k, err := base64.StdEncoding.DecodeString(kf.Keys[kf.Active])
	if kf.Active != ring.ActiveID() || len(kf.Keys) != 1 || err != nil || len(k) != keySize {
		t.Fatalf("key file = %s", b)
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode() & (os.ModePerm | os.ModeDir); got != want {
		t.Fatalf("%s has mode %v, want %v", path, got, want)
	}
}

func randomKey(t testing.TB) []byte {
	k := make([]byte, keySize)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}
