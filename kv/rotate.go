package kv

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

// Key rotation, in the order an operator runs it:
//
//  1. AddKey writes a new random key into the key file and makes it active.
//  2. Every refresher restarts with the new file: it opens values sealed
//     with any key of the ring and seals new ones with the active key.
//  3. Store.Reseal rewrites every credential still sealed with an older key.
//  4. RetireKeys drops the keys that no credential uses any more.
//
// A refresher that still runs with the old file cannot open a credential
// resealed under the new key, so step 3 comes after step 2 in a deployment
// that keeps running; with the refreshers stopped, 1 to 4 may run at once.

// IDs returns the ids of the ring's keys, sorted.
func (r *KeyRing) IDs() []string { return slices.Sorted(maps.Keys(r.aeads)) }

// AddKey adds a new random key to the key file at path, makes it the active
// one and returns its id; the other keys stay so that values sealed with
// them still open. The file is replaced atomically and keeps mode 0600. Run
// one key-file change at a time: two concurrent ones may lose a key.
func AddKey(path string) (id string, err error) {
	kf, err := readKeyFile(path)
	if err != nil {
		return "", fmt.Errorf("add key to %s: %w", path, err)
	}
	key := make([]byte, keySize)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("%w: random key: %w", ErrSealKey, err)
	}
	id = nextKeyID(kf.Keys, time.Now())
	kf.Keys[id] = base64.StdEncoding.EncodeToString(key)
	kf.Active = id
	if _, err := kf.ring(path); err != nil {
		return "", err
	}
	if err := writeKeyFile(path, kf); err != nil {
		return "", err
	}
	return id, nil
}

// nextKeyID returns "k<n>-<date>" with n one more than the largest number
// of the existing ids, so ids sort in the order keys were added.
func nextKeyID(keys map[string]string, now time.Time) string {
	n := 0
	for id := range keys {
		num, _, _ := strings.Cut(strings.TrimPrefix(id, "k"), "-")
		if v, err := strconv.Atoi(num); err == nil && v > n {
			n = v
		}
	}
	for {
		n++
		id := fmt.Sprintf("k%d-%s", n, now.UTC().Format("20060102"))
		if _, taken := keys[id]; !taken {
			return id
		}
	}
}

// RetireKeys removes from the key file at path every key that is not active
// and not in inUse (key id → number of credentials sealed with it, as
// Store.KeyUsage reports), and returns the ids removed. Values sealed with
// a removed key no longer open, which is the point: take inUse from a
// KeyUsage run after the last Reseal.
func RetireKeys(path string, inUse map[string]int) (removed []string, err error) {
	kf, err := readKeyFile(path)
	if err != nil {
		return nil, fmt.Errorf("retire keys of %s: %w", path, err)
	}
	for _, id := range slices.Sorted(maps.Keys(kf.Keys)) {
		if id != kf.Active && inUse[id] == 0 {
			delete(kf.Keys, id)
			removed = append(removed, id)
		}
	}
	if len(removed) == 0 {
		return nil, nil
	}
	if err := writeKeyFile(path, kf); err != nil {
		return nil, err
	}
	return removed, nil
}

// writeKeyFile replaces the key file atomically: a reader sees the old file
// or the new one, never a half-written one.
func writeKeyFile(path string, kf keyFile) error {
	data, err := json.MarshalIndent(kf, "", "  ")
	if err != nil {
		return fmt.Errorf("%w: encode key file: %w", ErrSealKey, err)
	}
	data = append(data, '\n')
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("%w: write key file: %w", ErrSealKey, err)
	}
	defer os.Remove(tmp.Name())
	for _, step := range []func() error{
		func() error { return tmp.Chmod(0o600) },
		func() error { _, err := tmp.Write(data); return err },
		tmp.Sync,
		tmp.Close,
		func() error { return os.Rename(tmp.Name(), path) },
	} {
		if err := step(); err != nil {
			tmp.Close()
			return fmt.Errorf("%w: write key file %s: %w; the old file is unchanged", ErrSealKey, path, err)
		}
	}
	// Losing the new key would lose every value sealed with it.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// OpenStore binds to an existing credential bucket without changing its
// configuration (NewStore would update it), for tools that run beside the
// refreshers.
func OpenStore(ctx context.Context, js jetstream.JetStream, bucket string, ring *KeyRing) (*Store, error) {
	if ring == nil {
		return nil, fmt.Errorf("kv: store %s: %w: no key ring; load one with LoadOrCreateKeyRing", bucket, ErrSealKey)
	}
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("kv: open credential bucket %s: %w; start a refresher once to create it, and check --prefix", bucket, err)
	}
	return bindStore(ctx, js, kv, ring)
}

// OpenLeases binds to an existing lease bucket without changing its
// configuration; leases it hands out live ttl.
func OpenLeases(ctx context.Context, js jetstream.JetStream, bucket string, ttl time.Duration) (*Leases, error) {
	cfg := LeaseConfig{Bucket: bucket, TTL: ttl}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("kv: open lease bucket %s: %w; start a refresher once to create it, and check --prefix", bucket, err)
	}
	return bindLeases(ctx, js, kv, cfg)
}

// sealedKeyIDs returns the key ids the stored record's secrets are sealed
// with, without opening them, and the record's schema.
func sealedKeyIDs(data []byte) (ids []string, schema int, err error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, 0, fmt.Errorf("stored record is not valid JSON: %w", err)
	}
	for _, s := range []*Sealed{r.SealedAccess, r.RefreshToken, r.ClientSecret} {
		if s != nil && !slices.Contains(ids, s.KeyID) {
			ids = append(ids, s.KeyID)
		}
	}
	return ids, r.Schema, nil
}

// KeyUsage counts, per key id, the credentials whose current record holds
// a value sealed with that key. Older revisions kept as history are not
// counted: they are audit, and once their key is retired they no longer
// open, as a retired key should.
func (s *Store) KeyUsage(ctx context.Context) (map[string]int, error) {
	keys, err := s.List(ctx, "")
	if err != nil {
		return nil, err
	}
	usage := map[string]int{}
	for _, k := range keys {
		entry, err := s.kv.Get(ctx, k.String())
		if err != nil {
			if errors.Is(mapErr(credentials, opRead, err), ErrNotFound) {
				continue // deleted since the listing
			}
			return nil, fmt.Errorf("key usage: get credential %s: %w", k, err)
		}
		ids, _, err := sealedKeyIDs(entry.Value())
		if err != nil {
			return nil, fmt.Errorf("key usage: credential %s: %w", k, err)
		}
		for _, id := range ids {
			usage[id]++
		}
	}
	return usage, nil
}

// ResealReport counts what Reseal did.
type ResealReport struct {
	Scanned   int // credentials looked at
	Resealed  int // rewritten under the active key and the current record schema
	Current   int // already sealed so (or holding no secret)
	Conflicts int // compare-and-set losses, each retried on the new revision
	Busy      int // credentials being refreshed on every attempt; run Reseal again
	Failed    int // credentials that could not be resealed; see the error
}

// resealAttempts bounds the tries per credential; between them a refresh or
// registration that got in first has usually finished.
const resealAttempts = 5

// Reseal rewrites every credential whose secrets are sealed with a key
// other than the ring's active one, or that an older version wrote in an
// older record schema (whose seal binds less, see sealAD). Each rewrite holds the credential's
// refresh lease (taken in leases as holder), so no refresh is in flight
// whose store would lose its compare-and-set to the reseal and discard an
// already redeemed token; and it is itself a compare-and-set on the
// revision read, retried on conflict, so a concurrent registration is never
// overwritten. A credential whose lease stays held is counted Busy; run
// Reseal again. The error joins every per-credential failure.
func (s *Store) Reseal(ctx context.Context, leases *Leases, holder string) (ResealReport, error) {
	var rep ResealReport
	keys, err := s.List(ctx, "")
	if err != nil {
		return rep, err
	}
	var errs []error
	for _, k := range keys {
		rep.Scanned++
		err := s.resealOne(ctx, leases, holder, k, &rep)
		if err != nil {
			rep.Failed++
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return rep, errors.Join(errs...)
}

func (s *Store) resealOne(ctx context.Context, leases *Leases, holder string, k events.Key, rep *ResealReport) error {
	for attempt := 1; ; attempt++ {
		entry, err := s.kv.Get(ctx, k.String())
		if err != nil {
			if errors.Is(mapErr(credentials, opRead, err), ErrNotFound) {
				rep.Current++ // deleted since the listing: nothing left to reseal
				return nil
			}
			return fmt.Errorf("reseal %s: %w", k, err)
		}
		ids, schema, err := sealedKeyIDs(entry.Value())
		if err != nil {
			return fmt.Errorf("reseal %s: %w", k, err)
		}
		if schema == recordSchema && !slices.ContainsFunc(ids, func(id string) bool { return id != s.ring.ActiveID() }) {
			rep.Current++
			return nil
		}
		lease, err := leases.Claim(ctx, k, holder, Read{})
		if errors.Is(err, ErrLeaseHeld) {
			if attempt == resealAttempts {
				rep.Busy++
				return nil
			}
			if err := sleepCtx(ctx, leases.TTL()/4); err != nil {
				return fmt.Errorf("reseal %s: %w", k, err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("reseal %s: %w", k, err)
		}
		err = s.rewrite(ctx, lease, k)
		if rerr := lease.Release(context.WithoutCancel(ctx)); rerr != nil && !errors.Is(rerr, ErrLeaseLost) {
			err = errors.Join(err, rerr)
		}
		switch {
		case err == nil:
			rep.Resealed++
			return nil
		case errors.Is(err, ErrConflict) && attempt < resealAttempts:
			rep.Conflicts++
		default:
			return fmt.Errorf("reseal %s: %w", k, err)
		}
	}
}

// rewrite reads the credential under the lease from the stream leader (the
// read before the claim may be stale) and stores it sealed with the active
// key, CAS on the revision read.
func (s *Store) rewrite(ctx context.Context, lease *Lease, k events.Key) error {
	c, rev, err := s.Latest(ctx, k)
	if err != nil {
		return err
	}
	if !lease.Trusted(time.Now()) {
		return fmt.Errorf("lease expired before the rewrite: %w", ErrConflict)
	}
	_, err = s.UpdateUnder(ctx, lease, c, rev)
	return err
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
