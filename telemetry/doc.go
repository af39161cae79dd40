// Package telemetry is how authbus processes are observed: OpenTelemetry
// trace and meter providers built from the standard OTEL_* environment
// (Setup), trace context carried across NATS in message headers
// (Inject/Extract), the operations HTTP listener with /metrics, /healthz and
// /readyz (StartOps), and the structured logger whose records name the
// current trace and span (NewLogger, TraceHandler).
//
// There is no released OTel propagator for NATS headers, so this package
// implements a propagation.TextMapCarrier over nats.Header and uses the W3C
// Trace Context propagator: the traceparent and tracestate headers that any
// NATS client, in any language, can set and read.
//
// Nothing here ever records a token or a secret; callers decide what goes
// into spans and metrics, and authbus gives them keys and fingerprints only.
package telemetry
