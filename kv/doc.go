// Package kv keeps authbus state in JetStream key-value buckets: the
// credential store and the per-credential refresh leases.
//
// The credential store ([Store]) holds one record per credential key, updated
// only by compare-and-set on the revision that was read, so a late writer
// finds out ([ErrConflict]) instead of overwriting newer tokens. Access
// tokens, refresh tokens and client secrets are sealed at rest with
// AES-256-GCM under a [KeyRing], each bound to its credential key, its field
// and the record schema, so neither a KV read nor a store file yields a
// usable token, and neither a record moved to another key nor sealed fields
// swapped within one open; in memory each is a [Secret], which never
// renders in logs.
//
// Leases ([Leases], [Lease]) make sure that at most one refresher works on a
// credential at a time. A lease is a value fenced by its revision: it keeps
// itself alive until released, and its renewals and its release succeed
// only while that revision is still the current one, so a holder that lost
// its lease learns so ([Lease.Done], [ErrLeaseLost]) instead of touching
// someone else's. A crashed holder's lease expires by itself (per-key TTL).
//
// The fence: a refresher must never present a refresh token a peer already
// redeemed. It loads the credential ([Store.Load]), claims the lease with
// what it read ([Leases.Claim]), and acts on what [Store.Fence] hands back:
// the read itself when the claim proves it current, else the record read
// from the credential stream's leader, which, unlike a KV get that any
// replica may answer, sees every acknowledged write. A released lease
// leaves a marker stating the credential revision its holder stored
// (recorded by [Store.UpdateUnder]), which is one of the two proofs; a
// write without the lease restates it ([Leases.WroteWithout]).
//
// The package knows buckets, revisions, sealing and leases; it knows nothing
// of OAuth flows, events or workers.
package kv
