// Package workers is where the wire protocol (events), the stores (kv) and
// the token endpoint meet: the pool that consumes auth.401 and auth.expiring
// events from the shared work-queue stream and refreshes each credential
// exactly once per generation, and the request/reply service that answers
// auth.register and auth.token.
//
// Any number of pools, in any number of processes, share one durable
// consumer; the per-credential lease in KV makes sure only one of them calls
// the token endpoint for a credential at a time, and compare-and-set on the
// credential's revision makes sure a late result never overwrites a newer one.
package workers
