package kv

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

func testCredential(t testing.TB, key string) *Credential {
	t.Helper()
	k, err := events.ParseKey(key)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	return &Credential{
		Key:           k,
		Version:       1,
		AccessToken:   Secret("at-" + key),
		TokenType:     "Bearer",
		Fingerprint:   "0123456789abcdef",
		ExpiresAt:     now.Add(time.Hour),
		ReceivedAt:    now,
		RefreshToken:  Secret("rt-plain-refresh-token-" + key),
		ClientSecret:  Secret("cs-plain-client-secret-" + key),
		TokenEndpoint: "https://idp.example/token",
		ClientID:      "client-1",
		AuthStyle:     "basic",
		Grant:         "refresh_token",
		Scopes:        []string{"openid", "offline_access"},
		Resource:      "https://mcp.example/",
		State:         StateActive,
		UpdatedAt:     now,
	}
}

func TestStoreCreateGet(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	rev, err := b.store.Create(b.ctx, c)
	if err != nil || rev == 0 {
		t.Fatalf("Create = %d, %v", rev, err)
	}
	got, gotRev, err := b.store.Get(b.ctx, c.Key)
	if err != nil || gotRev != rev {
		t.Fatalf("Get = rev %d, %v; want rev %d", gotRev, err, rev)
	}
	if !reflect.DeepEqual(got, c) {
		t.Fatalf("Get returned\n%+v\nwant\n%+v", *got, *c)
	}
	if got.RefreshToken.Reveal() != c.RefreshToken.Reveal() || got.ClientSecret.Reveal() != c.ClientSecret.Reveal() {
		t.Fatal("sealed secrets did not round-trip")
	}

	t.Run("exists", func(t *testing.T) {
		_, err := b.store.Create(b.ctx, c)
		if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "acme.alice.github") {
			t.Fatalf("second Create: %v, want ErrExists naming the key", err)
		}
	})
	t.Run("not found", func(t *testing.T) {
		_, _, err := b.store.Get(b.ctx, events.Key{Tenant: "acme", User: "bob", Server: "github"})
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get of unknown key: %v, want ErrNotFound", err)
		}
	})
	t.Run("invalid key", func(t *testing.T) {
		_, _, err := b.store.Get(b.ctx, events.Key{Tenant: "acme", User: "*", Server: "github"})
		if !errors.Is(err, events.ErrInvalidKey) {
			t.Fatalf("Get of bad key: %v, want events.ErrInvalidKey", err)
		}
	})
}

func TestStoreNoSecrets(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	c.RefreshToken, c.ClientSecret = "", "" // a client without secret, a grant without refresh token
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatal(err)
	}
	entry, err := b.store.Bucket().Get(b.ctx, c.Key.String())
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(entry.Value(), []byte(`"refresh_token":`)) || bytes.Contains(entry.Value(), []byte(`"client_secret":`)) {
		t.Fatalf("empty secrets are stored: %s", entry.Value())
	}
	got, _, err := b.store.Get(b.ctx, c.Key)
	if err != nil || !got.RefreshToken.IsZero() || !got.ClientSecret.IsZero() {
		t.Fatalf("Get = %+v, %v", got, err)
	}
}

func TestStoreSealedAtRest(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatal(err)
	}
	entry, err := b.store.Bucket().Get(b.ctx, c.Key.String())
	if err != nil {
		t.Fatal(err)
	}
	raw := entry.Value()
	for _, secret := range []Secret{c.AccessToken, c.RefreshToken, c.ClientSecret} {
		if bytes.Contains(raw, []byte(secret.Reveal())) {
			t.Fatalf("stored bytes contain a plain secret:\n%s", raw)
		}
	}
	for _, want := range []string{`"schema":3`, `"sealed_access_token":{"kid":"test-1"`, `"refresh_token":{"kid":"test-1"`, `"client_secret":{"kid":"test-1"`} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Fatalf("stored bytes lack %s:\n%s", want, raw)
		}
	}

	// A record copied under another tenant's key must not open there.
	if _, err := b.store.Bucket().Put(b.ctx, "evil.alice.github", raw); err != nil {
		t.Fatal(err)
	}
	_, _, err = b.store.Get(b.ctx, events.Key{Tenant: "evil", User: "alice", Server: "github"})
	if !errors.Is(err, ErrUnseal) {
		t.Fatalf("Get of a record moved to another key: %v, want ErrUnseal", err)
	}
}

func TestStoreUpdate(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	rev1, err := b.store.Create(b.ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	next := c.Clone()
	next.Version, next.AccessToken, next.RefreshToken = 2, "at-2", "rt-2"
	rev2, err := b.store.Update(b.ctx, next, rev1)
	if err != nil || rev2 <= rev1 {
		t.Fatalf("Update = %d, %v", rev2, err)
	}

	// A late refresher that read rev1 must not overwrite version 2.
	late := c.Clone()
	late.Version, late.AccessToken = 2, "at-late"
	if _, err := b.store.Update(b.ctx, late, rev1); !errors.Is(err, ErrConflict) {
		t.Fatalf("Update at a stale revision: %v, want ErrConflict", err)
	}
	got, rev, err := b.store.Get(b.ctx, c.Key)
	if err != nil || rev != rev2 || got.AccessToken.Reveal() != "at-2" || got.RefreshToken.Reveal() != "rt-2" {
		t.Fatalf("after lost CAS: rev %d (want %d), token %s, err %v", rev, rev2, got.AccessToken.Reveal(), err)
	}

	if _, err := b.store.Update(b.ctx, next, 0); err == nil {
		t.Fatal("Update at revision 0 succeeded")
	}
	gone := testCredential(t, "acme.nobody.github")
	if _, err := b.store.Update(b.ctx, gone, rev2); !errors.Is(err, ErrConflict) {
		t.Fatalf("Update of a missing credential: %v, want ErrConflict", err)
	}
}

func TestStoreDelete(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	rev1, err := b.store.Create(b.ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	rev2, err := b.store.Update(b.ctx, c, rev1)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.store.Delete(b.ctx, c.Key, rev1); !errors.Is(err, ErrConflict) {
		t.Fatalf("Delete at a stale revision: %v, want ErrConflict", err)
	}
	if _, _, err := b.store.Get(b.ctx, c.Key); err != nil {
		t.Fatalf("credential gone after a failed Delete: %v", err)
	}
	if err := b.store.Delete(b.ctx, c.Key, rev2); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, _, err := b.store.Get(b.ctx, c.Key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: %v, want ErrNotFound", err)
	}
	// Purged, so the old sealed refresh tokens are not kept in history.
	if hist, _ := b.store.Bucket().History(b.ctx, c.Key.String()); len(hist) != 1 {
		t.Fatalf("history after Delete has %d entries, want only the purge marker", len(hist))
	}

	// Registered again after deletion, then deleted unconditionally.
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatalf("Create after Delete: %v", err)
	}
	if err := b.store.Delete(b.ctx, c.Key, 0); err != nil {
		t.Fatalf("unconditional Delete: %v", err)
	}
	if _, _, err := b.store.Get(b.ctx, c.Key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after unconditional Delete: %v, want ErrNotFound", err)
	}
}

func TestStoreList(t *testing.T) {
	t.Parallel()
	b := setup(t)
	if keys, err := b.store.List(b.ctx, ""); err != nil || len(keys) != 0 {
		t.Fatalf("List of an empty bucket = %v, %v", keys, err)
	}
	for _, k := range []string{"acme.bob.github", "acme.alice.github", "acme.alice.slack", "other.alice.github", "acmex.carol.github"} {
		if _, err := b.store.Create(b.ctx, testCredential(t, k)); err != nil {
			t.Fatal(err)
		}
	}
	// Deleted credentials are not listed.
	if err := b.store.Delete(b.ctx, events.Key{Tenant: "acme", User: "bob", Server: "github"}, 0); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		tenant string
		want   []string
	}{
		{"acme", []string{"acme.alice.github", "acme.alice.slack"}},
		{"other", []string{"other.alice.github"}},
		{"nobody", nil},
		{"", []string{"acme.alice.github", "acme.alice.slack", "acmex.carol.github", "other.alice.github"}},
	} {
		keys, err := b.store.List(b.ctx, tc.tenant)
		if err != nil {
			t.Fatalf("List(%q): %v", tc.tenant, err)
		}
		var got []string
		for _, k := range keys {
			got = append(got, k.String())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("List(%q) = %v, want %v", tc.tenant, got, tc.want)
		}
	}

	for _, bad := range []string{"*", ">", "acme.alice", "a b"} {
		if _, err := b.store.List(b.ctx, bad); !errors.Is(err, events.ErrInvalidKey) {
			t.Errorf("List(%q): %v, want events.ErrInvalidKey", bad, err)
		}
	}
}

func TestNewStore(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatal(err)
	}
	// A second refresher opens the same bucket and sees the same data.
	again, err := NewStore(b.ctx, b.js, StoreConfig{Bucket: b.store.Bucket().Bucket()}, b.ring)
	if err != nil {
		t.Fatalf("second NewStore: %v", err)
	}
	if _, _, err := again.Get(b.ctx, c.Key); err != nil {
		t.Fatalf("Get through the second store: %v", err)
	}
	st, err := again.Bucket().Status(b.ctx)
	if err != nil || st.History() != 5 {
		t.Fatalf("bucket history = %d, %v; want the default 5", st.History(), err)
	}

	_, err = NewStore(b.ctx, b.js, StoreConfig{Replicas: -1, History: 100}, b.ring)
	for _, want := range []string{"Bucket is empty", "Replicas is -1", "History is 100"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("NewStore with a bad config: %v; want it to say %q", err, want)
		}
	}
	if _, err := NewStore(b.ctx, b.js, StoreConfig{Bucket: "x"}, nil); !errors.Is(err, ErrSealKey) {
		t.Errorf("NewStore without a ring: %v, want ErrSealKey", err)
	}
}

func TestCredential(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		state   State
		expires time.Time
		want    bool
	}{
		{"active, no expiry", StateActive, time.Time{}, true},
		{"active, expires later", StateActive, now.Add(time.Second), true},
		{"active, expires now", StateActive, now, false},
		{"active, expired", StateActive, now.Add(-time.Second), false},
		{"needs reauth", StateNeedsReauth, now.Add(time.Hour), false},
	} {
		c := Credential{State: tc.state, ExpiresAt: tc.expires}
		if got := c.Valid(now); got != tc.want {
			t.Errorf("%s: Valid = %v, want %v", tc.name, got, tc.want)
		}
	}

	c := testCredential(t, "acme.alice.github")
	cp := c.Clone()
	cp.Scopes[0] = "changed"
	if c.Scopes[0] != "openid" {
		t.Fatal("Clone shares Scopes")
	}
}

// legacyRecord is c as a refresher of record schema 1 or 2 wrote it: each
// secret sealed with the credential key alone as additional data, the
// access token in plain text in schema 1.
func legacyRecord(t *testing.T, ring *KeyRing, c *Credential, schema int) []byte {
	t.Helper()
	seal := func(s Secret) *Sealed {
		sealed, err := ring.Seal([]byte(s.Reveal()), []byte(c.Key.String()))
		if err != nil {
			t.Fatal(err)
		}
		return &sealed
	}
	r := record{Schema: schema, Version: c.Version, TokenType: c.TokenType, Fingerprint: c.Fingerprint,
		ExpiresAt: c.ExpiresAt, ReceivedAt: c.ReceivedAt, RefreshToken: seal(c.RefreshToken), ClientSecret: seal(c.ClientSecret),
		TokenEndpoint: c.TokenEndpoint, ClientID: c.ClientID, AuthStyle: c.AuthStyle, Grant: c.Grant,
		Scopes: c.Scopes, Resource: c.Resource, State: c.State, UpdatedAt: c.UpdatedAt}
	if schema == 1 {
		r.AccessToken = c.AccessToken.Reveal()
	} else {
		r.SealedAccess = seal(c.AccessToken)
	}
	data, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// Records written by older versions (schema 1: access token in plain text;
// schema 2: secrets bound to the key only) still read, and their next
// write is schema 3. A schema this build does not know is refused by name.
func TestStoreReadsOlderSchemas(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, schema := range []int{1, 2} {
		c := testCredential(t, fmt.Sprintf("acme.old%d.github", schema))
		rev, err := b.store.Bucket().Put(b.ctx, c.Key.String(), legacyRecord(t, b.ring, c, schema))
		if err != nil {
			t.Fatal(err)
		}
		got, gotRev, err := b.store.Get(b.ctx, c.Key)
		if err != nil {
			t.Fatalf("Get of a schema %d record: %v", schema, err)
		}
		if got.AccessToken != c.AccessToken || got.RefreshToken != c.RefreshToken || got.ClientSecret != c.ClientSecret || gotRev != rev {
			t.Errorf("a schema %d record did not read back its secrets", schema)
		}
		got.Version++
		if _, err := b.store.Update(b.ctx, got, gotRev); err != nil {
			t.Fatal(err)
		}
		entry, err := b.store.Bucket().Get(b.ctx, c.Key.String())
		if err != nil || !bytes.Contains(entry.Value(), []byte(`"schema":3`)) {
			t.Errorf("a schema %d record was not rewritten as schema 3: %s %v", schema, entry.Value(), err)
		}
		if again, _, err := b.store.Get(b.ctx, c.Key); err != nil || again.RefreshToken != c.RefreshToken {
			t.Errorf("the rewritten record does not open: %v", err)
		}
	}

	c := testCredential(t, "acme.future.github")
	var rec map[string]any
	if err := json.Unmarshal(legacyRecord(t, b.ring, c, 2), &rec); err != nil {
		t.Fatal(err)
	}
	rec["schema"] = 4
	future, _ := json.Marshal(rec)
	if _, err := b.store.Bucket().Put(b.ctx, c.Key.String(), future); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.store.Get(b.ctx, c.Key); err == nil || !strings.Contains(err.Error(), "schema 4") {
		t.Errorf("Get of a schema 4 record: %v, want an error naming the schema", err)
	}
}

// Someone who can write the credential bucket, but holds no seal key, must
// not make the store hand out one secret in the place of another: swapped
// sealed fields (the refresh token where auth.token reads the access
// token), or a record relabelled as an older schema to get the looser
// binding back, fail to open with ErrUnseal.
func TestStoreSealedFieldsCannotBeSwapped(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.alice.github")
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatal(err)
	}
	entry, err := b.store.Bucket().Get(b.ctx, c.Key.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		tamper func(rec map[string]json.RawMessage)
	}{
		{"refresh token served as the access token", func(rec map[string]json.RawMessage) {
			rec["sealed_access_token"], rec["refresh_token"] = rec["refresh_token"], rec["sealed_access_token"]
		}},
		{"client secret as the access token", func(rec map[string]json.RawMessage) {
			rec["sealed_access_token"] = rec["client_secret"]
		}},
		{"client secret as the refresh token", func(rec map[string]json.RawMessage) {
			rec["refresh_token"], rec["client_secret"] = rec["client_secret"], rec["refresh_token"]
		}},
		{"relabelled as schema 2", func(rec map[string]json.RawMessage) {
			rec["schema"] = json.RawMessage("2")
			rec["sealed_access_token"], rec["refresh_token"] = rec["refresh_token"], rec["sealed_access_token"]
		}},
		{"relabelled as schema 1", func(rec map[string]json.RawMessage) {
			rec["schema"] = json.RawMessage("1")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rec map[string]json.RawMessage
			if err := json.Unmarshal(entry.Value(), &rec); err != nil {
				t.Fatal(err)
			}
			tc.tamper(rec)
			bad, _ := json.Marshal(rec)
			if _, err := b.store.Bucket().Put(b.ctx, c.Key.String(), bad); err != nil {
				t.Fatal(err)
			}
			got, _, err := b.store.Get(b.ctx, c.Key)
			if !errors.Is(err, ErrUnseal) {
				t.Fatalf("Get of a tampered record = %+v, %v; want ErrUnseal", got, err)
			}
			for _, secret := range []Secret{c.RefreshToken, c.ClientSecret} {
				if strings.Contains(err.Error(), secret.Reveal()) {
					t.Fatal("the error names a secret")
				}
			}
		})
	}
}

func TestStoreFence(t *testing.T) {
	t.Parallel()
	b := setup(t)
	c := testCredential(t, "acme.again.github")
	if _, err := b.store.Create(b.ctx, c); err != nil {
		t.Fatal(err)
	}
	loaded, read, err := b.store.Load(b.ctx, c.Key)
	if err != nil {
		t.Fatal(err)
	}
	claim := func(read Read) *Lease {
		t.Helper()
		l, err := b.leases.Claim(b.ctx, c.Key, "w1", read)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}

	// The claim proves the read: Fence hands it back without a read.
	l := claim(read)
	before := b.nc.Stats().OutMsgs
	got, grev, err := b.store.Fence(b.ctx, l, loaded)
	if err != nil || got != loaded || grev != read.Revision || b.nc.Stats().OutMsgs != before {
		t.Fatalf("Fence of a proven read = %p, %d, %v (%d requests); want the same credential back, no request", got, grev, err, b.nc.Stats().OutMsgs-before)
	}
	if l.left != 0 {
		t.Errorf("the lease leaves %d after a read, want nothing stated until it stores", l.left)
	}
	n := loaded.Clone()
	n.Version++
	n.AccessToken = "at-newer"
	nrev, err := b.store.UpdateUnder(b.ctx, l, n, grev)
	if err != nil || l.left != nrev {
		t.Fatalf("UpdateUnder = %d, %v; the lease leaves %d, want the revision written", nrev, err, l.left)
	}
	if _, err := b.store.UpdateUnder(b.ctx, l, n, grev); !errors.Is(err, ErrConflict) || l.left != 0 {
		t.Fatalf("UpdateUnder at a stale revision: %v, the lease leaves %d; want ErrConflict, leaving nothing stated", err, l.left)
	}
	if err := l.Release(b.ctx); err != nil {
		t.Fatal(err)
	}

	// A claim that proves nothing: Fence reads the latest from the leader.
	l = claim(Read{})
	got, grev, err = b.store.Fence(b.ctx, l, loaded)
	if err != nil || got == loaded || grev != nrev || got.Version != n.Version || got.AccessToken != "at-newer" {
		t.Fatalf("Fence after an update = version %d rev %d (%v); want version %d rev %d decoded", got.Version, grev, err, n.Version, nrev)
	}
	if l.left != 0 {
		t.Errorf("the lease leaves %d after a read, want nothing stated until it stores", l.left)
	}
	if err := l.Release(b.ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.store.Delete(b.ctx, c.Key, nrev); err != nil {
		t.Fatal(err)
	}
	l = claim(Read{})
	defer l.Release(b.ctx)
	if _, _, err := b.store.Fence(b.ctx, l, loaded); !errors.Is(err, ErrNotFound) {
		t.Errorf("Fence of a deleted credential: %v, want ErrNotFound", err)
	}
	if _, _, err := b.store.Latest(b.ctx, c.Key); !errors.Is(err, ErrNotFound) {
		t.Errorf("Latest of a deleted credential: %v, want ErrNotFound", err)
	}
}
