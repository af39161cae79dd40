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
//
// Two ideas the pool uses live in packages of their own: egress decides
// which hosts a refresher may call (Config.TokenHosts), and discovery finds
// an authorization server's endpoints from its issuer (Config.Discovery),
// for the publisher's login and revoke too.
package workers
