// Package client is the Go library a runtime uses to take part in authbus:
// one import and three lines give it an HTTP client whose bearer token is
// always the one the refreshers consider current.
//
//	src, err := client.New(nc, "acme.alice.github", client.WithRuntime("mcp-host-3"))
//	defer src.Close()
//	resp, err := src.Client().Get("https://api.github.com/user")
//
// A Source keeps a local copy of one credential's access token. It asks the
// refreshers' token service (auth.token.<key>) on first use and whenever its
// copy is missing or expired, and otherwise keeps the copy current from the
// auth.rotated and auth.needs_reauth events of the key, so in normal
// operation Token makes no network call at all. Source implements
// oauth2.TokenSource, so it also fits golang.org/x/oauth2's Transport.
//
// A Transport (what Source.Client uses) sets the Authorization header. When
// a request still gets 401 it follows the protocol's recipe for a 401
// (docs/protocol.md, "The runtime recipe"): it reports the refused token
// (auth.401, with the token's fingerprint only), asks auth.token at once,
// and otherwise waits, bounded, for a token with a different fingerprint,
// re-asking now and then; then it replays the request once. Many
// goroutines, clients and processes that see the same 401 cause one
// token-endpoint call: the events stream de-duplicates the reports by token
// fingerprint, and the ask right after the report answers a runtime whose
// report was dropped as a duplicate after the rotation. When only a person
// can repair the credential, the request fails with a *NeedsReauthError
// instead of retrying. Renew runs the same recipe for a runtime that does
// not send its requests through net/http; Report401 and Replacement are its
// two halves.
//
// With WithExpiring the Source also reports auth.expiring itself shortly
// before its token expires, as the refreshers' own scheduler does.
//
// For tools rather than runtimes, FetchToken reads a token once without
// subscribing, and Watch follows the events of many keys.
//
// # NATS connection
//
// The caller owns the *nats.Conn: its reconnect policy, its credentials and
// its inbox prefix. With per-tenant NATS permissions (docs/protocol.md,
// "Connecting"), a tenant's user may only subscribe to its own inboxes, so
// connect with nats.CustomInboxPrefix("_INBOX_<tenant>"): token requests
// and JetStream publish acknowledgements use the connection's inboxes, and
// without the prefix every request times out. The user needs permission to
// publish <prefix>.401.<tenant>.> and <prefix>.expiring.<tenant>.>, to
// request <prefix>.token.<tenant>.>, and to subscribe to
// <prefix>.rotated.<tenant>.> and <prefix>.needs_reauth.<tenant>.>.
//
// # Tracing
//
// Every publish and request carries the W3C trace context of the caller's
// context (for a Transport, the request's) in its NATS headers, under a
// producer span of the tracer "github.com/authbus/authbus/client" from the
// global OpenTelemetry provider (a no-op until the program installs one).
// Access tokens never appear in spans, logs or errors; fingerprints do.
package client
