package kv

import (
	"errors"

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
// streams use a second code for the same condition.
func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}
