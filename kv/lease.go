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
	js         jetstream.JetStream
	kv         jetstream.KeyValue
	stream     jetstream.Stream // the bucket's stream, to read a key's last message with its headers
	ttl        time.Duration
	putPrefix  string // subject prefix of the bucket's keys, for raw publishes to them
	subPrefix  string // the same without an API prefix: the keys' subjects in the stream
	replicated bool   // more than one replica: reads may come from a lagging follower
}

// leaseMarkerTTL is how long a lease key's marker lives: the one the server
// writes when a lease expires by itself, and the one Release writes. Fencing
// does not depend on markers (a renew or release at an old revision fails
// with or without one); Lease.Covers relies on a marker living at least this
// long. While one exists the next Claim of that key costs three round trips
// instead of one, so keep them as short as the server allows. A constant
// also keeps refreshers configured with different lease TTLs from rewriting
// the bucket's config back and forth.
const leaseMarkerTTL = time.Second

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
// any number of refreshers may call it for the same bucket.
func NewLeases(ctx context.Context, js jetstream.JetStream, cfg LeaseConfig) (*Leases, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	bucket, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "authbus refresh leases (one key per credential being refreshed)",
		// A lease has no history worth keeping; with 1, a renew or a
		// release replaces the key's one message.
		History:        1,
		Replicas:       cfg.Replicas,
		LimitMarkerTTL: leaseMarkerTTL, // also what enables per-key TTLs
	})
	if err != nil {
		return nil, fmt.Errorf("kv: create or update lease bucket %s: %w", cfg.Bucket, err)
	}
	return bindLeases(ctx, js, bucket, cfg)
}

// bindLeases completes a Leases on its bucket.
func bindLeases(ctx context.Context, js jetstream.JetStream, bucket jetstream.KeyValue, cfg LeaseConfig) (*Leases, error) {
	stream, err := js.Stream(ctx, "KV_"+cfg.Bucket)
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
		replicated: stream.CachedInfo().Config.Replicas > 1}, nil
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

// TTL returns the lease TTL, rounded up to whole seconds.
func (l *Leases) TTL() time.Duration { return l.ttl }

// Claim takes the lease of k for holder (a name for operators: process,
// host). It succeeds only if nobody holds it; otherwise the error wraps
// ErrLeaseHeld and names the holder. The lease expires by itself after TTL
// unless renewed.
//
// Claim does what kv.Create does (create the key, or claim over the marker
// a lease that ended left on it) by hand, because it must learn what
// kv.Create does not say: whether the key had no message at all, or which
// marker it claimed over (see Lease.Covers). On a held key it names the
// holder from the same read.
func (l *Leases) Claim(ctx context.Context, k events.Key, holder string) (*Lease, error) {
	if err := k.Validate(); err != nil {
		return nil, err
	}
	if holder == "" {
		return nil, fmt.Errorf("claim lease %s: holder is empty; name the process that claims it", k)
	}
	lease := &Lease{leases: l, key: k, holder: []byte(holder)}
	var last uint64 // the key's last message, as far as we know; 0: none
	for attempt := 1; ; attempt++ {
		// Taken before the request: the server starts the TTL when it
		// stores the key, which is later, so trust measured from here ends
		// earlier.
		start := time.Now()
		ack, err := l.js.Publish(ctx, l.putPrefix+k.String(), lease.holder,
			jetstream.WithExpectLastSequencePerSubject(last),
			jetstream.WithMsgTTL(l.ttl),
		)
		if err == nil {
			lease.rev, lease.start = ack.Sequence, start
			if last == 0 {
				lease.quietAt = time.Now()
			}
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
		// The key has a message: a holder's lease, or a marker.
		msg, err := l.stream.GetLastMsgForSubject(ctx, l.subPrefix+k.String())
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			last, lease.after = 0, 0 // the marker expired meanwhile
			continue
		case err != nil:
			return nil, fmt.Errorf("claim lease %s: read its key: %w", k, err)
		case !isMarker(msg.Header):
			return nil, fmt.Errorf("claim lease %s: held by %q: %w", k, msg.Data, ErrLeaseHeld)
		}
		last = msg.Sequence
		lease.after, _ = strconv.ParseUint(msg.Header.Get(leftRevisionHeader), 10, 64)
	}
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

// Lease is a held claim on one credential, fenced by its revision: Renew and
// Release act only while that revision is still the key's current one. It is
// safe for concurrent use: Renew may run in a goroutine while the owner
// checks Trusted; Renew and Release are serialised.
type Lease struct {
	leases *Leases
	key    events.Key
	holder []byte
	// Set once, by the claim: when a claim that found the key without any
	// message was answered (zero otherwise), and the record revision the
	// marker it claimed over states (0: none).
	quietAt time.Time
	after   uint64

	opMu sync.Mutex // held across Renew and Release: each must start from the revision the last one left

	mu    sync.Mutex // guards the fields below; never held across I/O, so Trusted does not wait on the network
	rev   uint64
	start time.Time // when the last successful claim or renew request was sent
	state leaseState
	left  uint64 // the record revision the holder leaves behind (see Leaves); 0: unknown
}

// Covers reports whether a read of the credential record that returned
// revision rev, sent at t, before the claim, still sees every write made
// under a lease of the key: then the holder need not read the record again
// after claiming. That read again is the fence that keeps a refresher
// from presenting a refresh token a peer redeemed between its read and its
// claim; Covers proves it unneeded in two ways.
//
// The claim found the key without any message: a lease that ends leaves a
// marker the server removes no earlier than the marker TTL (one second)
// later, so the last lease to end ended at least that long before the
// claim was answered. Covers demands that t be less than half of it before
// the answer, which leaves half a second for clock steps and rate
// differences; holders store before they release.
//
// Or the claim took over the marker of a release that stated the revision
// its holder left behind (see Leaves), and rev is at least that: that
// holder's view already covered every earlier holder's writes, and its own.
//
// The first proof needs the read to see every write committed before it.
// On a replicated bucket (and the credential bucket has the lease bucket's
// replicas) KV reads are direct gets that a lagging follower may answer,
// so there only the second counts: a stale read returns a revision below
// the stated one and is read again.
//
// Neither covers a holder that stores after its lease expired (it lost
// NATS for a whole TTL): its store may land after any read.
func (l *Lease) Covers(rev uint64, t time.Time) bool {
	if !l.quietAt.IsZero() {
		return !l.leases.replicated && l.quietAt.Sub(t) < leaseMarkerTTL/2
	}
	return l.after != 0 && l.after <= rev
}

// Leaves records the revision of the credential record that the holder
// leaves behind: the one it stored, or, if it stored nothing, the one it
// acted on. Release states it in the lease's marker for the next claimer
// (see Covers). Before a write whose outcome it cannot know yet, the
// holder calls Leaves(0): a write that timed out may still land, and a
// marker must never state a revision older than what is stored.
func (l *Lease) Leaves(rev uint64) {
	l.mu.Lock()
	l.left = rev
	l.mu.Unlock()
}

// Key returns the credential key the lease is for.
func (l *Lease) Key() events.Key { return l.key }

// Revision returns the lease's current revision (it changes on Renew).
func (l *Lease) Revision() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rev
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
	// server. With TTL 2s a lease is trusted for 1s after each renew; with
	// 30s, for 27s.
	return l.start.Add(l.leases.ttl - trustMargin(l.leases.ttl))
}

// Trusted reports whether a write made at now under the lease is safe: the
// lease is neither lost nor released, and now is before TrustedUntil.
func (l *Lease) Trusted(now time.Time) bool {
	until := l.TrustedUntil()
	return !until.IsZero() && now.Before(until)
}

// Renew extends the lease by a full TTL from now, if it is still ours. If the
// lease expired or was taken meanwhile, the error wraps ErrLeaseLost and the
// lease stays lost. Other errors (timeouts) leave it as it was: it may have
// been renewed or not, and Trusted runs out on the old deadline.
func (l *Lease) Renew(ctx context.Context) error {
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
	ack, err := l.leases.js.Publish(ctx, l.leases.putPrefix+l.key.String(), l.holder,
		jetstream.WithExpectLastSequencePerSubject(rev),
		jetstream.WithMsgTTL(l.leases.ttl),
	)
	if err != nil {
		err = mapErr(leases, opCAS, err)
		if errors.Is(err, ErrLeaseLost) {
			l.setState(leaseLost)
		}
		return fmt.Errorf("renew lease %s at revision %d: %w", l.key, rev, err)
	}
	l.mu.Lock()
	l.rev, l.start = ack.Sequence, start
	l.mu.Unlock()
	return nil
}

// Release gives the lease up by deleting its key, only if the revision is
// still ours. If it is not (the lease expired, or was taken by another
// holder), nothing is deleted and the error wraps ErrLeaseLost. Release is
// idempotent after success. After an error that is neither (a timeout), the
// release may or may not have happened; a retry then reports ErrLeaseLost
// if it had, and either way the key expires by itself.
func (l *Lease) Release(ctx context.Context) error {
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
	// as the key's last message, and while a marker exists the next Claim
	// of the key costs three round trips instead of one (create fails on
	// the marker, nats.go reads it, creates again at its revision). A Delete
	// marker stays forever; a purge marker with a TTL is gone a second
	// later, so a credential refreshed again later is claimed in one round
	// trip. LastRevision makes the server write the marker only if rev is
	// still the key's last revision: a newer holder's lease is never
	// touched.
	//
	// By hand rather than kv.Purge, to state the revision the holder
	// leaves behind (see Covers).
	m := nats.NewMsg(l.leases.putPrefix + l.key.String())
	m.Header.Set(kvOperationHeader, kvPurge)
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	if left != 0 {
		m.Header.Set(leftRevisionHeader, strconv.FormatUint(left, 10))
	}
	_, err := l.leases.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(leaseMarkerTTL))
	if err != nil {
		err = mapErr(leases, opCAS, err)
		if errors.Is(err, ErrLeaseLost) {
			l.setState(leaseLost)
		}
		return fmt.Errorf("release lease %s at revision %d: %w", l.key, rev, err)
	}
	l.setState(leaseReleased)
	return nil
}

func (l *Lease) setState(s leaseState) {
	l.mu.Lock()
	l.state = s
	l.mu.Unlock()
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
