package kv

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// MinLeaseTTL is the shortest lease TTL: a lease is trusted for its TTL less
// at least one second (see Lease.TrustedUntil), so a shorter TTL would
// leave no trusted time.
const MinLeaseTTL = 2 * time.Second

// LeaseConfig configures the lease bucket. Zero values mean the documented
// default.
type LeaseConfig struct {
	Bucket   string        // required
	TTL      time.Duration // required, at least MinLeaseTTL; rounded up to whole seconds
	Replicas int           // 0 means 1
}

func (c LeaseConfig) withDefaults() LeaseConfig {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	// Per-key TTLs are whole seconds on the server; rounding up keeps the
	// lease at least as long as asked for.
	c.TTL = (c.TTL + time.Second - 1).Truncate(time.Second)
	return c
}

func (c LeaseConfig) validate() error {
	var problems []error
	if c.Bucket == "" {
		problems = append(problems, errors.New("Bucket is empty; set it to the lease bucket's name"))
	}
	if c.TTL < MinLeaseTTL {
		problems = append(problems, fmt.Errorf("TTL is %v; set at least %v, longer than one token-endpoint call", c.TTL, MinLeaseTTL))
	}
	if c.Replicas < 0 {
		problems = append(problems, fmt.Errorf("Replicas is %d; set 1 to 5, or 0 for 1", c.Replicas))
	}
	if len(problems) > 0 {
		return fmt.Errorf("kv: lease config: %w", errors.Join(problems...))
	}
	return nil
}

// Leases hands out per-credential leases from a KV bucket of its own: a
// key exists while someone holds the lease of that credential, and expires
// by itself (per-key TTL) when its holder stops renewing it. Leases is safe
// for concurrent use.
type Leases struct {
	js        jetstream.JetStream
	kv        jetstream.KeyValue
	stream    jetstream.Stream // the bucket's stream, to read a key's last message with its headers
	ttl       time.Duration
	putPrefix string // subject prefix of the bucket's keys, for raw publishes to them
	subPrefix string // the same without an API prefix: the keys' subjects in the stream
	host      string // the standalone server that holds the bucket; "" in a cluster
	replicas  int
}

// leaseMarkerTTL is how long a lease key's marker lives: the one the server
// writes when a lease expires by itself, and the one Release writes on a
// standalone server. Fencing does not depend on markers (a renew or release
// at an old revision fails with or without one); claimProves relies on a
// marker living at least this long. There, while one exists the next Claim
// of that key costs three round trips instead of one, so keep them as short
// as the server allows. A constant also keeps refreshers configured with
// different lease TTLs from rewriting the bucket's config back and forth.
const leaseMarkerTTL = time.Second

// clusterMarkerTTL is how long the marker of a release lives on a
// clustered deployment, where a claim over a marker that states the
// revision its holder stored is the one proof that spares the leader read
// (claimProves): long enough that a credential refreshed again within
// minutes (a storm's waves, a runtime's retries) meets the marker its last
// holder left, short enough that the bucket keeps one only for recently
// refreshed credentials (one message of about 150 bytes each). Claims
// there read the key before writing (peek), so a marker costs them no
// extra round trip. On a standalone server, where the claim over an empty
// key proves a read current, markers stay leaseMarkerTTL.
const clusterMarkerTTL = 10 * time.Minute

// Headers of lease markers: KV's operation header and the server's marker
// reason (nats.go keeps both unexported), and ours, the credential record
// revision a released lease's holder left behind.
const (
	kvOperationHeader  = "KV-Operation"
	markerReasonHeader = "Nats-Marker-Reason"
	leftRevisionHeader = "Authbus-Credential-Revision"

	kvPurge, kvDelete = "PURGE", "DEL" // values of kvOperationHeader
)

// NewLeases creates the lease bucket, or updates it to cfg when it exists:
// any number of refreshers may call it for the same bucket. An existing
// bucket keeps its replica count (see Replicas).
func NewLeases(ctx context.Context, js jetstream.JetStream, cfg LeaseConfig) (*Leases, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	bucket, err := provisionBucket(ctx, js, jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "authbus refresh leases (one key per credential being refreshed)",
		// A lease has no history worth keeping; with 1, a renew or a
		// release replaces the key's one message.
		History:        1,
		Replicas:       cfg.Replicas,
		LimitMarkerTTL: leaseMarkerTTL, // also what enables per-key TTLs
	})
	if err != nil {
		return nil, err
	}
	return bindLeases(ctx, js, bucket, cfg)
}

// bindLeases completes a Leases on its bucket.
func bindLeases(ctx context.Context, js jetstream.JetStream, bucket jetstream.KeyValue, cfg LeaseConfig) (*Leases, error) {
	stream, err := js.Stream(ctx, BucketStream(cfg.Bucket))
	if err != nil {
		return nil, fmt.Errorf("kv: lease bucket %s: its stream: %w", cfg.Bucket, err)
	}
	// Raw publishes must go where kv.Put would: nats.go prefixes KV writes
	// with the API prefix when js uses a domain or custom prefix.
	subPrefix := "$KV." + cfg.Bucket + "."
	putPrefix := subPrefix
	if api := apiPrefix(js.Options()); api != jetstream.DefaultAPIPrefix {
		putPrefix = api + putPrefix
	}
	return &Leases{js: js, kv: bucket, stream: stream, ttl: cfg.TTL, putPrefix: putPrefix, subPrefix: subPrefix,
		host: standaloneHost(js, stream), replicas: stream.CachedInfo().Config.Replicas}, nil
}

func apiPrefix(o jetstream.JetStreamOptions) string {
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		if !strings.HasSuffix(o.APIPrefix, ".") {
			return o.APIPrefix + "."
		}
		return o.APIPrefix
	}
	return jetstream.DefaultAPIPrefix
}

// Replicas returns the bucket's replica count as deployed when the Leases
// was made: cfg.Replicas applies only to a bucket NewLeases creates.
func (l *Leases) Replicas() int { return l.replicas }

// TTL returns the lease TTL, rounded up to whole seconds.
func (l *Leases) TTL() time.Duration { return l.ttl }

// Claim takes the lease of k for holder (a name for operators: process,
// host). It succeeds only if nobody holds it; otherwise the error wraps
// ErrLeaseHeld and names the holder. read is what the caller read of the
// credential before claiming (Store.Load), or the zero Read; the claim
// works out whether that read is still current, which Store.Fence uses.
//
// The lease keeps itself alive: it renews every third of its TTL until it
// is released (or for at most four TTLs), and closes Done when it is lost
// or released. The caller must Release it.
//
// Claim does what kv.Create does (create the key, or claim over the marker
// a lease that ended left on it) by hand, because it must learn what
// kv.Create does not say: whether the key had no message at all, or which
// marker it claimed over (see claimProves). On a held key it names the
// holder from the same read.
func (l *Leases) Claim(ctx context.Context, k events.Key, holder string, read Read) (*Lease, error) {
	if err := k.Validate(); err != nil {
		return nil, err
	}
	if holder == "" {
		return nil, fmt.Errorf("claim lease %s: holder is empty; name the process that claims it", k)
	}
	var (
		last  uint64 // the key's last message, as far as we know; 0: none
		after uint64 // the revision the marker at last states; 0: none
	)
	if !l.standalone() {
		last, after = l.peek(ctx, k)
	}
	for attempt := 1; ; attempt++ {
		// Taken before the request: the server starts the TTL when it
		// stores the key, which is later, so trust measured from here ends
		// earlier.
		start := time.Now()
		ack, err := retryInProcess(ctx, func() (*jetstream.PubAck, error) {
			return l.js.Publish(ctx, l.putPrefix+k.String(), []byte(holder),
				jetstream.WithExpectLastSequencePerSubject(last),
				jetstream.WithMsgTTL(l.ttl),
			)
		})
		if err == nil {
			var quietAt time.Time
			if last == 0 {
				quietAt = time.Now()
			}
			lease := &Lease{leases: l, key: k, holder: []byte(holder), read: read,
				current: l.claimProves(read, quietAt, after),
				rev:     ack.Sequence, start: start,
				done: make(chan struct{}), stop: make(chan struct{})}
			lease.kept.Go(lease.keepAlive)
			return lease, nil
		}
		if !wrongLastSequence(err) {
			return nil, fmt.Errorf("claim lease %s: %w", k, err)
		}
		if attempt == 3 {
			// The key keeps changing under us (others claiming and
			// releasing it): let the caller come back later.
			return nil, fmt.Errorf("claim lease %s: %w", k, ErrLeaseHeld)
		}
		// The key has a message: a holder's lease, or a marker. Read from
		// the stream leader: a lagging follower's direct get would show a
		// lease already released as held, and the claim at a stale
		// sequence would only fail again.
		msg, err := l.leaderLast(ctx, k)
		switch {
		case errors.Is(err, ErrNotFound):
			last, after = 0, 0 // the marker expired meanwhile
			continue
		case err != nil:
			return nil, fmt.Errorf("claim lease %s: read its key: %w", k, err)
		case !isMarker(msg.Header):
			return nil, fmt.Errorf("claim lease %s: held by %q: %w", k, msg.Data, ErrLeaseHeld)
		}
		last = msg.Sequence
		after, _ = strconv.ParseUint(msg.Header.Get(leftRevisionHeader), 10, 64)
	}
}

// WroteWithout tells the leases of k that its credential record was
// written at rev without the lease (a registration). The marker the last
// release left, if it is the key's last message, is replaced by one that
// states rev: left as it was, a claim over it with a read older than rev
// (a lagging follower's) would count that read as current (claimProves)
// and present the refresh token the write replaced. A held lease is left
// alone: its holder's store at the revision it read fails on rev. What is
// not covered: a release and a claim over it that both land between the
// write and this call, a round trip. On a standalone server, whose reads
// are all current, there is nothing to do.
func (l *Leases) WroteWithout(ctx context.Context, k events.Key, rev uint64) error {
	if err := k.Validate(); err != nil {
		return err
	}
	if l.standalone() {
		return nil
	}
	for range 3 {
		msg, err := l.leaderLast(ctx, k)
		switch {
		case errors.Is(err, ErrNotFound):
			return nil
		case err != nil:
			return fmt.Errorf("restate the lease marker of %s: read its key: %w", k, err)
		case !isMarker(msg.Header):
			return nil
		}
		if after, _ := strconv.ParseUint(msg.Header.Get(leftRevisionHeader), 10, 64); after >= rev {
			return nil
		}
		err = l.mark(ctx, k, msg.Sequence, rev)
		if err == nil {
			return nil
		}
		if !wrongLastSequence(err) {
			return fmt.Errorf("restate the lease marker of %s: %w", k, err)
		}
		// Claimed or released meanwhile: look again.
	}
	return fmt.Errorf("restate the lease marker of %s: the key keeps changing (claims and releases); a refresh under way will see the write: %w", k, ErrLeaseHeld)
}

// leaderLast reads k's last message, markers included, from the lease
// stream's leader.
func (l *Leases) leaderLast(ctx context.Context, k events.Key) (*jetstream.RawStreamMsg, error) {
	return leaderGet(ctx, l.js.Conn(), apiPrefix(l.js.Options()), BucketStream(l.kv.Bucket()), l.subPrefix+k.String(), true)
}

// mark writes a marker on k, only if the key's last message is still at
// sequence last, stating left as the revision of the credential record
// stored last (nothing when 0). It lives leaseMarkerTTL on a standalone
// server and clusterMarkerTTL on a cluster. Written by hand rather than
// with kv.Purge, to state left (see claimProves).
func (l *Leases) mark(ctx context.Context, k events.Key, last, left uint64) error {
	m := nats.NewMsg(l.putPrefix + k.String())
	m.Header.Set(kvOperationHeader, kvPurge)
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	if left != 0 {
		m.Header.Set(leftRevisionHeader, strconv.FormatUint(left, 10))
	}
	ttl := leaseMarkerTTL
	if !l.standalone() {
		ttl = clusterMarkerTTL
	}
	_, err := retryInProcess(ctx, func() (*jetstream.PubAck, error) {
		return l.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(last), jetstream.WithMsgTTL(ttl))
	})
	return err
}

// peek reads k's last message with a direct get, which any replica may
// answer, and returns the sequence of the marker it finds there and the
// revision the marker states (zeros for anything else): Claim starts from
// it, so that a claim over a marker costs one write, not a failed write, a
// leader read and a write. A stale answer costs only that detour, since
// the write at a sequence that is no longer the key's last fails. A held
// lease is never a starting point: a write at its sequence would take it
// from its holder.
func (l *Leases) peek(ctx context.Context, k events.Key) (last, after uint64) {
	msg, err := l.stream.GetLastMsgForSubject(ctx, l.subPrefix+k.String())
	if err != nil || !isMarker(msg.Header) {
		return 0, 0
	}
	after, _ = strconv.ParseUint(msg.Header.Get(leftRevisionHeader), 10, 64)
	return msg.Sequence, after
}

// claimProves reports whether a claim proves read current: whether read,
// made before the claim, still sees every write made under a lease of the
// key, so that the holder need not read the record again (Store.Fence).
// quietAt is when a claim that found the key without any message was
// answered (zero otherwise); after is the revision the marker it claimed
// over states (0: none). There are two proofs.
//
// The claim took over the marker of a release that stated the revision
// its holder stored, and read is at least that: the holder's
// compare-and-set made that revision the latest, and a later write is
// made under a later lease (whose marker or key the claim would have met)
// or restates the marker (WroteWithout). This holds
// on any deployment: the marker is the key's last message (the claim at
// its sequence would have failed otherwise), and a read below the stated
// revision (a lagging follower's) proves nothing and is read again.
//
// Or the claim found the key without any message: a lease that ends
// leaves a marker the server removes no earlier than the marker TTL (one
// second) later, so the last lease to end ended at least that long before
// the claim was answered, and holders store before they release. The read
// must then have been sent less than half of that before the answer (half
// a second is left for clock steps and rate differences), and must see
// every write acknowledged before it. Both hold only on one standalone
// server holding both buckets: in a cluster a read may come from a lagging
// follower, and a marker written under one leader may be expired by the
// next on another clock.
//
// Neither covers a holder that stores after its lease expired (it lost
// NATS for a whole TTL): its store may land after any read.
func (l *Leases) claimProves(read Read, quietAt time.Time, after uint64) bool {
	switch {
	case read.Revision == 0:
		return false
	case after != 0:
		return after <= read.Revision
	case !quietAt.IsZero():
		return read.single && l.standalone() && quietAt.Sub(read.at) < leaseMarkerTTL/2
	}
	return false
}

// standalone reports whether the connection is to the standalone server
// that holds the lease bucket.
func (l *Leases) standalone() bool {
	nc := l.js.Conn()
	return l.host != "" && nc.ConnectedClusterName() == "" && nc.ConnectedServerName() == l.host
}

// isMarker reports whether a lease key's message ends a lease: a release's
// purge (or a delete) marker, or the marker the server writes when a lease
// expires.
func isMarker(h nats.Header) bool {
	switch h.Get(kvOperationHeader) {
	case kvPurge, kvDelete:
		return true
	}
	return h.Get(markerReasonHeader) != ""
}

// Holder reports who holds the lease of k, if anyone.
func (l *Leases) Holder(ctx context.Context, k events.Key) (holder string, held bool, err error) {
	if err := k.Validate(); err != nil {
		return "", false, err
	}
	entry, err := l.kv.Get(ctx, k.String())
	if err != nil {
		if err = mapErr(leases, opRead, err); errors.Is(err, ErrNotFound) {
			return "", false, nil
		}
		return "", false, fmt.Errorf("lease holder of %s: %w", k, err)
	}
	return string(entry.Value()), true, nil
}

type leaseState int

const (
	leaseHeld leaseState = iota
	leaseLost
	leaseReleased
)

// Lease is a held claim on one credential, fenced by its revision: its
// renewals and its release act only while that revision is still the key's
// current one, so a holder that lost it finds out instead of touching a
// newer holder's lease. Like an etcd concurrency.Session, it keeps itself
// alive until released and reports its end on Done. Writes made under it
// go through the Store (Fence, UpdateUnder), which records the revision
// the holder leaves behind; Release states that revision in the marker it
// leaves for the next claimer. It is safe for concurrent use.
type Lease struct {
	leases  *Leases
	key     events.Key
	holder  []byte
	read    Read // what the claimer read before claiming
	current bool // the claim proved read current (claimProves)

	done     chan struct{} // closed when the lease is lost or released
	doneOnce sync.Once
	stop     chan struct{} // closed by Release: ends keepAlive
	stopOnce sync.Once
	kept     sync.WaitGroup // keepAlive

	opMu sync.Mutex // held across renew and Release: each must start from the revision the last one left

	mu    sync.Mutex // guards the fields below; never held across I/O, so Trusted does not wait on the network
	rev   uint64
	start time.Time // when the last successful claim or renew request was sent
	state leaseState
	left  uint64 // the record revision the holder stored (see leaves); 0: none, or unknown
}

// leaves records the revision of the credential record that the holder
// stored under the lease. Release states it in the lease's marker for the
// next claimer (see claimProves). A holder that stored nothing states
// nothing: what it read may have been overwritten since by a writer
// without the lease (a registration). Before a write whose outcome it
// cannot know yet, the Store records 0: a write that timed out may still
// land, and a marker must never state a revision older than what is
// stored.
func (l *Lease) leaves(rev uint64) {
	l.mu.Lock()
	l.left = rev
	l.mu.Unlock()
}

// Key returns the credential key the lease is for.
func (l *Lease) Key() events.Key { return l.key }

// Revision returns the lease's current revision (it changes on renewal).
func (l *Lease) Revision() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rev
}

// Done returns a channel that is closed when the lease ends: lost (it
// expired, or another holder took it) or released.
func (l *Lease) Done() <-chan struct{} { return l.done }

// Lost reports whether the lease was lost rather than released.
func (l *Lease) Lost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state == leaseLost
}

// trustMargin is how much earlier than its TTL a lease stops being trusted.
func trustMargin(ttl time.Duration) time.Duration { return max(time.Second, ttl/10) }

// TrustedUntil returns the instant after which Trusted is false: use it as
// the deadline of work whose result is written under the lease. It is the
// zero time once the lease is lost or released.
func (l *Lease) TrustedUntil() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.state != leaseHeld {
		return time.Time{}
	}
	// How long a lease is trusted, and why that is shorter than its TTL:
	//
	//	trusted while  now < start + TTL − margin,   margin = max(1s, TTL/10)
	//
	// start is taken before the claim or renew request is sent, and the
	// server starts the TTL only when it stores the message, so start+TTL
	// is never later than the server's own expiry, measured on our clock.
	// The margin absorbs what that argument ignores: the server's TTLs are
	// whole seconds and it times them on its wall clock (which NTP may step
	// forward), its clock and ours may run at slightly different rates, and
	// a write made just before the deadline still needs time to reach the
	// server. With TTL 2s a lease is trusted for 1s after each renewal (one
	// every 0.67s); with 30s, for 27s (one every 10s).
	return l.start.Add(l.leases.ttl - trustMargin(l.leases.ttl))
}

// Trusted reports whether a write made at now under the lease is safe: the
// lease is neither lost nor released, and now is before TrustedUntil.
func (l *Lease) Trusted(now time.Time) bool {
	until := l.TrustedUntil()
	return !until.IsZero() && now.Before(until)
}

// maxHoldTTLs bounds how long a lease keeps itself alive, in TTLs: a
// holder that never releases it (a bug, a call that never returns) must not
// keep the credential from being refreshed for the life of the process.
// Work under a lease is bounded well below that (a token-endpoint call and
// a store retried for one TTL).
const maxHoldTTLs = 4

// keepAlive renews the lease every third of its TTL until Release stops it,
// the lease is lost, or it has been held maxHoldTTLs TTLs (then it counts
// as lost, and expires by itself). A renewal that fails otherwise (a timeout, a KV leader
// election) leaves the lease as it was, and the next one tries again;
// Trusted runs out on the old deadline meanwhile.
func (l *Lease) keepAlive() {
	every := l.leases.ttl / 3
	giveUp := time.Now().Add(maxHoldTTLs * l.leases.ttl)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		if time.Now().After(giveUp) {
			// It expires by itself; no write under it is safe from now.
			l.end(leaseLost)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), every)
		err := l.renew(ctx)
		cancel()
		if errors.Is(err, ErrLeaseLost) {
			return
		}
	}
}

// renew extends the lease by a full TTL from now, if it is still ours. If
// the lease expired or was taken meanwhile, the error wraps ErrLeaseLost
// and the lease stays lost. Other errors (timeouts) leave it as it was: it
// may have been renewed or not.
func (l *Lease) renew(ctx context.Context) error {
	l.opMu.Lock()
	defer l.opMu.Unlock()
	l.mu.Lock()
	rev, state := l.rev, l.state
	l.mu.Unlock()
	if err := stateErr("renew", l.key, state); err != nil {
		return err
	}

	start := time.Now()
	// kv.Update would drop the key's TTL and leave a lease that never
	// expires, so renew with a raw publish to the key's subject that carries
	// both the expected revision and a fresh TTL; its sequence is the new
	// revision.
	ack, err := retryInProcess(ctx, func() (*jetstream.PubAck, error) {
		return l.leases.js.Publish(ctx, l.leases.putPrefix+l.key.String(), l.holder,
			jetstream.WithExpectLastSequencePerSubject(rev),
			jetstream.WithMsgTTL(l.leases.ttl),
		)
	})
	if err != nil {
		err = mapErr(leases, opCAS, err)
		if errors.Is(err, ErrLeaseLost) {
			l.end(leaseLost)
		}
		return fmt.Errorf("renew lease %s at revision %d: %w", l.key, rev, err)
	}
	l.mu.Lock()
	l.rev, l.start = ack.Sequence, start
	l.mu.Unlock()
	return nil
}

// Release stops the lease's renewals and gives it up by purging its key,
// only if the revision is still ours; the purge marker states the record
// revision the holder leaves behind. If the lease is no longer ours (it
// expired, or was taken by another holder), nothing is purged and the
// error wraps ErrLeaseLost. Release is idempotent after success. After an
// error that is neither (a timeout), the release may or may not have
// happened; a retry then reports ErrLeaseLost if it had, and either way
// the key expires by itself.
func (l *Lease) Release(ctx context.Context) error {
	l.stopOnce.Do(func() { close(l.stop) })
	l.kept.Wait()
	l.opMu.Lock()
	defer l.opMu.Unlock()
	l.mu.Lock()
	rev, state, left := l.rev, l.state, l.left
	l.mu.Unlock()
	if state == leaseReleased {
		return nil
	}
	if err := stateErr("release", l.key, state); err != nil {
		return err
	}

	// Purge, not Delete, and with a TTL on its marker: both leave a marker
	// as the key's last message, and a Delete marker stays forever. On a
	// standalone server, where a Claim does not peek, a marker costs the
	// next Claim of the key three round trips instead of one (create fails
	// on the marker, the claim reads it, creates again at its revision), so
	// it is gone a second later; on a cluster it lives clusterMarkerTTL, to
	// prove the next claimer's read. The expected last sequence makes the server write
	// the marker only if rev is still the key's last revision: a newer
	// holder's lease is never touched.
	if err := l.leases.mark(ctx, l.key, rev, left); err != nil {
		err = mapErr(leases, opCAS, err)
		if errors.Is(err, ErrLeaseLost) {
			l.end(leaseLost)
		}
		return fmt.Errorf("release lease %s at revision %d: %w", l.key, rev, err)
	}
	l.end(leaseReleased)
	return nil
}

// end records that the lease is lost or released, and closes Done.
func (l *Lease) end(s leaseState) {
	l.mu.Lock()
	l.state = s
	l.mu.Unlock()
	l.doneOnce.Do(func() { close(l.done) })
}

func stateErr(op string, k events.Key, s leaseState) error {
	switch s {
	case leaseLost:
		return fmt.Errorf("%s lease %s: %w", op, k, ErrLeaseLost)
	case leaseReleased:
		return fmt.Errorf("%s lease %s: already released: %w", op, k, ErrLeaseLost)
	}
	return nil
}
