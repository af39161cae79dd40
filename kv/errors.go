package kv

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Errors callers must tell apart. They are returned wrapped (with the key and
// the operation); test for them with errors.Is.
var (
	// ErrNotFound: the credential is not registered.
	ErrNotFound = errors.New("credential not found")
	// ErrExists: Create found the credential already registered; read it and
	// Update it instead.
	ErrExists = errors.New("credential already exists")
	// ErrConflict: a compare-and-set lost, the credential's revision changed
	// since it was read; re-read it and decide again.
	ErrConflict = errors.New("credential changed since it was read (revision conflict)")
	// ErrLeaseHeld: another holder has the lease; try again later.
	ErrLeaseHeld = errors.New("lease held by another holder")
	// ErrLeaseLost: the lease expired or was taken over; do not write
	// anything under it.
	ErrLeaseLost = errors.New("lease lost (expired or taken by another holder)")
	// ErrSealKey: the seal key file or key ring is missing, malformed,
	// unsafe, or lacks the key a value was sealed with.
	ErrSealKey = errors.New("seal key problem")
	// ErrUnseal: a sealed value failed authentication: it was tampered with,
	// moved to another credential, or the key under its key id has changed.
	ErrUnseal = errors.New("sealed value does not open")
)

// bucketKind says which bucket an operation ran on: the same server answer
// means different things in the credential store and in the lease bucket.
type bucketKind int

const (
	credentials bucketKind = iota
	leases
)

// opKind says what a failed JetStream call tried to do. The server reports
// "key exists" and "revision changed" with the same error code (wrong last
// sequence), so only the operation tells them apart.
type opKind int

const (
	opRead   opKind = iota // get the latest value
	opCreate               // write only if the key has no value
	opCAS                  // write or delete only at a given revision
)

// mapErr is the one place that decides what a JetStream error means for kv.
// Errors it does not recognise (timeouts, connection loss, permissions) are
// returned unchanged.
func mapErr(b bucketKind, op opKind, err error) error {
	if err == nil {
		return nil
	}
	switch op {
	case opRead:
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return ErrNotFound
		}
	case opCreate:
		if errors.Is(err, jetstream.ErrKeyExists) || wrongLastSequence(err) {
			if b == leases {
				return ErrLeaseHeld
			}
			return ErrExists
		}
	case opCAS:
		// ErrKeyRevisionMismatch covers kv.Update and kv.Delete/Purge; the
		// raw lease-renew publish returns the bare API error.
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || wrongLastSequence(err) {
			if b == leases {
				return ErrLeaseLost
			}
			return ErrConflict
		}
	}
	return err
}

// wrongLastSequence reports whether err is the server's "wrong last sequence"
// answer to a publish with an expected per-subject sequence. Replicated
// streams also answer with a second code (see inProcess).
func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// inProcess reports whether err is a replicated stream leader's refusal to
// check a conditional write at all: another write to the same subject was
// still in process there (JSErrCodeStreamWrongLastSequenceConstant, "wrong
// last sequence" without a sequence). nats-server 2.15 answers a write
// only when it applies it, and forgets that the subject is in process just
// after: a holder that releases its lease a few milliseconds after the
// claim's acknowledgement was refused so, its key unchanged (2 of 16 runs of
// TestFenceWithLaggingFollower). It says nothing about the expected
// sequence, so it is no conflict: the write is tried again (retryInProcess).
func inProcess(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// retryInProcess runs write, again while the leader refuses it as in
// process (see inProcess), for up to about a second: the write in process
// is applied within a replication round trip, and then the condition is
// checked for real. Trying again is safe because the refused write was
// never checked nor stored.
func retryInProcess[T any](ctx context.Context, write func() (T, error)) (T, error) {
	wait := time.Millisecond
	for attempt := 1; ; attempt++ {
		v, err := write()
		if err == nil || !inProcess(err) || attempt == 12 {
			return v, err
		}
		if serr := sleepCtx(ctx, wait); serr != nil {
			return v, err
		}
		wait = min(2*wait, 200*time.Millisecond)
	}
}
