// Package telemetry carries OpenTelemetry trace context across NATS and
// builds the structured logger every authbus process uses.
//
// There is no released OTel propagator for NATS headers, so this package
// implements a propagation.TextMapCarrier over nats.Header and uses the W3C
// Trace Context propagator: the traceparent and tracestate headers that any
// NATS client, in any language, can set and read.
package telemetry
