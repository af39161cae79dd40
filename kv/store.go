package kv

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/authbus/authbus/events"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// StoreConfig configures the credential bucket. Zero values mean the
// documented default.
type StoreConfig struct {
	Bucket   string // required
	Replicas int    // 0 means 1
	History  int    // 0 means 5 (a little history for audit)
}

func (c StoreConfig) withDefaults() StoreConfig {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.History == 0 {
		c.History = 5
	}
	return c
}

func (c StoreConfig) validate() error {
	var problems []error
	if c.Bucket == "" {
		problems = append(problems, errors.New("Bucket is empty; set it to the credential bucket's name"))
	}
	if c.Replicas < 0 {
		problems = append(problems, fmt.Errorf("Replicas is %d; set 1 to 5, or 0 for 1", c.Replicas))
	}
	if c.History < 0 || c.History > jetstream.KeyValueMaxHistory {
		problems = append(problems, fmt.Errorf("History is %d; set 1 to %d, or 0 for 5", c.History, jetstream.KeyValueMaxHistory))
	}
	if len(problems) > 0 {
		return fmt.Errorf("kv: store config: %w", errors.Join(problems...))
	}
	return nil
}

// Store is the credential store: one JSON record per credential key, with
// the access token, refresh token and client secret sealed. Every write is a
// compare-and-set on the revision the writer read, so a late writer gets
// ErrConflict instead of overwriting newer tokens. A Store is safe for
// concurrent use; the Credentials it returns are the caller's own.
type Store struct {
	kv        jetstream.KeyValue
	ring      *KeyRing
	nc        *nats.Conn
	api       string // JetStream API prefix, for leader reads
	stream    string // the bucket's stream
	subPrefix string // subject prefix of the bucket's keys in the stream
	host      string // the standalone server that holds the bucket; "" in a cluster (see Load)
	replicas  int
}

// NewStore creates the credential bucket, or updates it to cfg when it exists:
// any number of refreshers may call it for the same bucket. An existing
// bucket keeps its replica count (see Replicas).
func NewStore(ctx context.Context, js jetstream.JetStream, cfg StoreConfig, ring *KeyRing) (*Store, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if ring == nil {
		return nil, fmt.Errorf("kv: store %s: %w: no key ring; load one with LoadOrCreateKeyRing", cfg.Bucket, ErrSealKey)
	}
	bucket, err := provisionBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "authbus credentials (tokens and client secrets sealed)",
		History:     uint8(cfg.History),
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, err
	}
	return bindStore(ctx, js, bucket, ring)
}

// bindStore completes a Store on its bucket.
func bindStore(ctx context.Context, js jetstream.JetStream, bucket jetstream.KeyValue, ring *KeyRing) (*Store, error) {
	name := bucket.Bucket()
	stream, err := js.Stream(ctx, BucketStream(name))
	if err != nil {
		return nil, fmt.Errorf("kv: credential bucket %s: its stream: %w", name, err)
	}
	return &Store{kv: bucket, ring: ring, nc: js.Conn(), api: apiPrefix(js.Options()), stream: BucketStream(name),
		subPrefix: "$KV." + name + ".", host: standaloneHost(js, stream),
		replicas: stream.CachedInfo().Config.Replicas}, nil
}

// Replicas returns the bucket's replica count as deployed when the Store
// was made: cfg.Replicas applies only to a bucket NewStore creates.
func (s *Store) Replicas() int { return s.replicas }

// Bucket returns the underlying bucket, for watching and inspection. Writes
// to it bypass sealing; use the Store's methods to write credentials.
func (s *Store) Bucket() jetstream.KeyValue { return s.kv }

// Get returns the credential of k and its revision, to pass to Update or
// Delete. A credential that is not registered is ErrNotFound.
func (s *Store) Get(ctx context.Context, k events.Key) (*Credential, uint64, error) {
	if err := k.Validate(); err != nil {
		return nil, 0, err
	}
	entry, err := s.kv.Get(ctx, k.String())
	if err != nil {
		return nil, 0, fmt.Errorf("get credential %s: %w", k, mapErr(credentials, opRead, err))
	}
	c, err := decodeCredential(s.ring, k, entry.Value())
	if err != nil {
		return nil, 0, fmt.Errorf("get credential %s (revision %d): %w", k, entry.Revision(), err)
	}
	return c, entry.Revision(), nil
}

// Create stores a new credential and returns its revision; a credential
// already registered under c.Key is ErrExists.
func (s *Store) Create(ctx context.Context, c *Credential) (uint64, error) {
	data, err := s.encode(c)
	if err != nil {
		return 0, err
	}
	rev, err := retryInProcess(ctx, func() (uint64, error) { return s.kv.Create(ctx, c.Key.String(), data) })
	if err != nil {
		return 0, fmt.Errorf("create credential %s: %w", c.Key, mapErr(credentials, opCreate, err))
	}
	return rev, nil
}

// Update replaces the credential if its revision is still rev (as returned
// by Get, Create or an earlier Update) and returns the new revision. If it
// changed in between, nothing is written and the error is ErrConflict.
func (s *Store) Update(ctx context.Context, c *Credential, rev uint64) (uint64, error) {
	if rev == 0 {
		// Revision 0 would mean "only if absent" to the server.
		return 0, fmt.Errorf("update credential %s: revision 0; pass the revision from Get, or use Create for a new credential", c.Key)
	}
	data, err := s.encode(c)
	if err != nil {
		return 0, err
	}
	newRev, err := retryInProcess(ctx, func() (uint64, error) { return s.kv.Update(ctx, c.Key.String(), data, rev) })
	if err != nil {
		return 0, fmt.Errorf("update credential %s at revision %d: %w", c.Key, rev, mapErr(credentials, opCAS, err))
	}
	return newRev, nil
}

// Delete removes the credential and its history if its revision is still rev
// (ErrConflict otherwise); rev 0 deletes unconditionally, and is not an
// error for a credential that does not exist.
func (s *Store) Delete(ctx context.Context, k events.Key, rev uint64) error {
	if err := k.Validate(); err != nil {
		return err
	}
	// Purge, not Delete: the history holds old (sealed) refresh tokens, and
	// a deleted credential should not keep them.
	_, err := retryInProcess(ctx, func() (struct{}, error) {
		return struct{}{}, s.kv.Purge(ctx, k.String(), jetstream.LastRevision(rev))
	})
	if err != nil {
		return fmt.Errorf("delete credential %s at revision %d: %w", k, rev, mapErr(credentials, opCAS, err))
	}
	return nil
}

// List returns the keys of the credentials of tenant, sorted; tenant ""
// lists every tenant's. Keys in the bucket that are not credential keys
// (written by something else) are skipped.
func (s *Store) List(ctx context.Context, tenant string) ([]events.Key, error) {
	filter := ">"
	if tenant != "" {
		// The tenant becomes part of a subject filter: a wildcard in it
		// would list other tenants' keys.
		if err := (events.Key{Tenant: tenant, User: "x", Server: "x"}).Validate(); err != nil {
			return nil, fmt.Errorf("list credentials of tenant %q: tenant must be 1-%d characters of [A-Za-z0-9_-]: %w",
				tenant, events.MaxKeyPartLen, events.ErrInvalidKey)
		}
		filter = tenant + ".>"
	}
	// ListKeysFiltered stops its lister when ctx ends; our own cancel makes
	// sure its goroutine and subscription end when we return.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lister, err := s.kv.ListKeysFiltered(ctx, filter)
	if err != nil {
		return nil, fmt.Errorf("list credentials (filter %s): %w", filter, err)
	}
	defer lister.Stop()
	var keys []events.Key
	for name := range lister.Keys() {
		k, err := events.ParseKey(name)
		if err != nil {
			continue
		}
		keys = append(keys, k)
	}
	// The lister closes its channel on cancellation as well as at the end:
	// a cancelled listing must not pass for a complete one.
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list credentials (filter %s): %w", filter, err)
	}
	slices.SortFunc(keys, func(a, b events.Key) int { return cmp.Compare(a.String(), b.String()) })
	// The lister may report a key twice when it is written during the listing.
	return slices.Compact(keys), nil
}

func (s *Store) encode(c *Credential) ([]byte, error) {
	if err := c.Key.Validate(); err != nil {
		return nil, err
	}
	data, err := encodeCredential(s.ring, c)
	if err != nil {
		return nil, fmt.Errorf("encode credential %s: %w", c.Key, err)
	}
	return data, nil
}
