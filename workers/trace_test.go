package workers_test

import (
	"context"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/telemetry"
)

// Done-when 1: a 401 published under a producer span yields one trace:
// process (consumer, child of the publish), lease claim, the token-endpoint
// HTTP client span, store and the auth.rotated publish, all children of the
// process span; the auth.rotated message carries the publish span onward,
// and the log record of the event names the process span.
func TestTraceOfOneRefresh(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, nil)
	key := fleet.MustKey(t, "acme.alice.github")
	tok := o.AS.Issue(fleet.ClientID)
	o.Register(t, key, tok, nil)

	rotatedHeaders := make(chan nats.Header, 4)
	sub, err := o.NC.Subscribe(o.Subj.Event(events.TypeRotated, key), func(m *nats.Msg) {
		if ev, err := events.Decode(events.TypeRotated, key, m.Data); err == nil && ev.Rotated.Version == 2 {
			rotatedHeaders <- m.Header
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := o.NC.Flush(); err != nil {
		t.Fatal(err)
	}

	fp := events.Fingerprint(tok.AccessToken)
	pub, _ := o.publish401(t, key, fp, "rt-1", true)
	var rotatedHeader nats.Header
	select {
	case rotatedHeader = <-rotatedHeaders:
	case <-time.After(20 * time.Second):
		t.Fatal("no auth.rotated within 20s")
	}
	o.Settled(t)

	var proc sdktrace.ReadOnlySpan
	fleet.Eventually(t, 10*time.Second, "the process span ended", func() bool {
		ps := o.ended(isProcess)
		if len(ps) == 1 {
			proc = ps[0]
		}
		return len(ps) == 1
	})
	if proc.Name() != "process auth.401.*.*.*" {
		t.Errorf("process span name %q", proc.Name())
	}
	if proc.Parent().SpanID() != pub.SpanID() || !proc.Parent().IsRemote() || proc.SpanContext().TraceID() != pub.TraceID() {
		t.Errorf("process span parent %v, want the remote publish span %v", proc.Parent(), pub)
	}
	for k, want := range map[string]string{
		"messaging.system":         "nats",
		"messaging.operation.type": "process",
		// Received from the work queue the intake wrote it to; named
		// after the runtime's subject.
		"messaging.destination.name":     o.Subj.Work(events.Type401, key),
		"messaging.destination.template": "auth.401.*.*.*",
		"messaging.consumer.group.name":  "refreshers",
		"messaging.message.id":           events.MsgID(events.Type401, key, fp),
		"cloudevents.event_type":         "auth.401",
		"authbus.credential.key":         key.String(),
		"authbus.fingerprint":            fp,
		"authbus.outcome":                "rotated",
		"authbus.attempt":                "1",
	} {
		if got := attrOf(proc, k); got != want {
			t.Errorf("process span %s = %q, want %q", k, got, want)
		}
	}

	children := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.Parent().SpanID() == proc.SpanContext().SpanID() }) {
		if s.SpanContext().TraceID() != pub.TraceID() {
			t.Errorf("child %q is in another trace", s.Name())
		}
		children[s.Name()] = s
	}
	for _, want := range []struct {
		name  string
		kind  trace.SpanKind
		attrs map[string]string
	}{
		{"lease claim", trace.SpanKindInternal, map[string]string{"authbus.credential.key": key.String(), "authbus.lease.held": "false"}},
		{"POST", trace.SpanKindClient, map[string]string{
			"http.request.method": "POST", "http.response.status_code": "200",
			"url.full": o.AS.TokenURL(), "server.address": "127.0.0.1"}},
		{"store credential", trace.SpanKindInternal, map[string]string{"authbus.credential.key": key.String(), "authbus.credential.version": "2"}},
		{"send auth.rotated.*.*.*", trace.SpanKindProducer, map[string]string{
			"messaging.system": "nats", "messaging.operation.type": "send",
			"messaging.destination.name": o.Subj.Event(events.TypeRotated, key), "authbus.credential.key": key.String()}},
	} {
		s, ok := children[want.name]
		if !ok {
			t.Errorf("no child span %q of the process span; children: %v", want.name, slices.Sorted(maps.Keys(children)))
			continue
		}
		if s.SpanKind() != want.kind {
			t.Errorf("span %q kind %v, want %v", want.name, s.SpanKind(), want.kind)
		}
		for k, v := range want.attrs {
			if got := attrOf(s, k); got != v {
				t.Errorf("span %q %s = %q, want %q", want.name, k, got, v)
			}
		}
	}

	// The announcement continues the trace: its traceparent is the send span.
	if send, ok := children["send auth.rotated.*.*.*"]; ok {
		sc := trace.SpanContextFromContext(telemetry.Extract(context.Background(), rotatedHeader))
		if sc.SpanID() != send.SpanContext().SpanID() || sc.TraceID() != pub.TraceID() {
			t.Errorf("auth.rotated traceparent %v, want the send span %v", sc, send.SpanContext())
		}
	}
	recs := o.Logs.Records(map[string]string{"msg": "event processed", "outcome": "rotated"})
	if len(recs) != 1 || recs[0]["trace_id"] != pub.TraceID().String() || recs[0]["span_id"] != proc.SpanContext().SpanID().String() {
		t.Errorf("log record of the event: %v; want trace_id %s span_id %s", recs, pub.TraceID(), proc.SpanContext().SpanID())
	}
}

// A proactive refresh is a trace of its own: the registration's server span
// holds the send span of the schedule, and the refresh the schedule fires,
// a new root, links to that send span instead of growing the registration's
// trace; the refresh schedules the next generation inside its own trace.
func TestTraceOfScheduledRefresh(t *testing.T) {
	o := setupObserved(t)
	o.AS.SetExpiresIn(3600) // the next generation is not due in this test
	o.start(t, 1, nil)
	key := fleet.MustKey(t, "acme.scheduled.github")
	w := o.Watch(t, key)
	o.Register(t, key, o.AS.Issue(fleet.ClientID), func(r *events.RegisterRequest) { r.Token.ExpiresIn = 2 })
	w.WaitFor(t, "the proactive rotation", fleet.RotatedVersion(2))

	var proc sdktrace.ReadOnlySpan
	fleet.Eventually(t, 10*time.Second, "the scheduled refresh's process span", func() bool {
		for _, s := range o.ended(isProcess) {
			if s.Name() == "process auth.expiring.*.*.*" && attrOf(s, "authbus.outcome") == "rotated" {
				proc = s
				return true
			}
		}
		return false
	})
	byName := func(name string) []sdktrace.ReadOnlySpan {
		return o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.Name() == name })
	}
	regs := byName("process auth.register.*.*.*")
	if len(regs) != 1 || regs[0].SpanKind() != trace.SpanKindServer || attrOf(regs[0], "authbus.credential.key") != key.String() {
		t.Fatalf("register server spans: %d, want 1 of kind server with the key", len(regs))
	}
	reg := regs[0]
	var first, next sdktrace.ReadOnlySpan
	fleet.Eventually(t, 10*time.Second, "both schedules' send spans ended", func() bool {
		first, next = nil, nil
		for _, s := range byName("send auth.proactive.*.*.*") {
			switch s.Parent().SpanID() {
			case reg.SpanContext().SpanID():
				first = s
			case proc.SpanContext().SpanID():
				next = s
			}
		}
		return first != nil && next != nil
	})
	if first.SpanKind() != trace.SpanKindProducer || first.SpanContext().TraceID() != reg.SpanContext().TraceID() {
		t.Errorf("first schedule's send span: kind %v trace %s, want a producer in the registration's trace", first.SpanKind(), first.SpanContext().TraceID())
	}
	if proc.Parent().IsValid() {
		t.Errorf("scheduled refresh's process span has parent %v, want a new root", proc.Parent())
	}
	if l := proc.Links(); len(l) != 1 || l[0].SpanContext.SpanID() != first.SpanContext().SpanID() || l[0].SpanContext.TraceID() != first.SpanContext().TraceID() {
		t.Errorf("scheduled refresh's links = %v, want exactly the schedule's send span %v", l, first.SpanContext())
	}
	if next.SpanContext().TraceID() != proc.SpanContext().TraceID() {
		t.Errorf("the next schedule's send span is in trace %s, want the refresh's %s", next.SpanContext().TraceID(), proc.SpanContext().TraceID())
	}
}

// Requests to the token service are server spans, children of the caller's
// span; an error reply marks the span failed with its code.
func TestTraceOfTokenRequest(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, nil)
	key := fleet.MustKey(t, "acme.nobody.github")
	ctx, caller := o.tp.Tracer("test-runtime").Start(context.Background(), "get token", trace.WithSpanKind(trace.SpanKindClient))
	msg := nats.NewMsg(o.Subj.Token(key))
	msg.Header = telemetry.Inject(ctx, msg.Header)
	reply, err := o.NC.RequestMsg(msg, 5*time.Second)
	caller.End()
	if err != nil {
		t.Fatal(err)
	}
	if code := reply.Header.Get("Nats-Service-Error-Code"); code != "404" {
		t.Fatalf("reply error code %q, want 404 for an unregistered credential", code)
	}
	var srv sdktrace.ReadOnlySpan
	// The pools' start-up probes ask for tokens too: take the one under ours.
	fleet.Eventually(t, 5*time.Second, "the token request's server span under the caller's", func() bool {
		s := o.ended(func(s sdktrace.ReadOnlySpan) bool {
			return s.Name() == "process auth.token.*.*.*" && s.Parent().SpanID() == caller.SpanContext().SpanID()
		})
		if len(s) == 1 {
			srv = s[0]
		}
		return srv != nil
	})
	if srv.SpanKind() != trace.SpanKindServer || srv.SpanContext().TraceID() != caller.SpanContext().TraceID() {
		t.Errorf("server span kind %v trace %s, want server in the caller's trace %s", srv.SpanKind(), srv.SpanContext().TraceID(), caller.SpanContext().TraceID())
	}
	if srv.Status().Code != codes.Error || attrOf(srv, "error.type") != "not_found" {
		t.Errorf("server span status %v error.type %q, want Error not_found", srv.Status(), attrOf(srv, "error.type"))
	}
	if got := attrOf(srv, "authbus.credential.key"); got != key.String() {
		t.Errorf("server span key %q, want %q", got, key)
	}
}
