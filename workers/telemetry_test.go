package workers_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers"
)

// observed is a fleet whose pools trace into an in-memory recorder and
// meter into a manual reader, and log through telemetry's trace handler.
type observed struct {
	*fleet.Fleet
	spans  *tracetest.SpanRecorder
	tp     *sdktrace.TracerProvider
	reader *sdkmetric.ManualReader
	mp     *sdkmetric.MeterProvider
}

func setupObserved(t testing.TB) *observed {
	t.Helper()
	o := &observed{Fleet: fleet.Setup(t), spans: tracetest.NewSpanRecorder(), reader: sdkmetric.NewManualReader()}
	o.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(o.spans))
	o.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(o.reader))
	// Registered before the pools start, so it runs after they stop.
	t.Cleanup(func() {
		_ = o.tp.Shutdown(context.Background())
		_ = o.mp.Shutdown(context.Background())
	})
	return o
}

// start starts n pools that report to o's providers.
func (o *observed) start(t testing.TB, n int, tune func(*workers.Config)) {
	t.Helper()
	o.StartPools(t, n, func(c *workers.Config) {
		c.TracerProvider, c.MeterProvider = o.tp, o.mp
		c.Logger = slog.New(telemetry.TraceHandler(slog.NewJSONHandler(o.Logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		if tune != nil {
			tune(c)
		}
	})
}

// registerOne registers a fresh credential under key and returns the key
// and its access token's fingerprint.
func (o *observed) registerOne(t testing.TB, key string) (events.Key, string) {
	t.Helper()
	k := fleet.MustKey(t, key)
	tok := o.AS.Issue(fleet.ClientID)
	o.Register(t, k, tok, nil)
	return k, events.Fingerprint(tok.AccessToken)
}

// publish401 publishes a 401 as an instrumented runtime does: inside a
// producer span whose context travels in the message headers.
func (o *observed) publish401(t testing.TB, key events.Key, fp, runtime string, withMsgID bool) (trace.SpanContext, *jetstream.PubAck) {
	t.Helper()
	data, err := events.Encode(key, "test/"+runtime, events.Unauthorized{Fingerprint: fp, Runtime: runtime, Status: 401})
	if err != nil {
		t.Fatal(err)
	}
	ctx, span := o.tp.Tracer("test-runtime").Start(context.Background(), "send auth.401.*.*.*", trace.WithSpanKind(trace.SpanKindProducer))
	defer span.End()
	msg := nats.NewMsg(o.Subj.Event(events.Type401, key))
	msg.Data = data
	msg.Header = telemetry.Inject(ctx, msg.Header)
	var opts []jetstream.PublishOpt
	if withMsgID {
		opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, fp)))
	}
	ack, err := o.JS.PublishMsg(ctx, msg, opts...)
	if err != nil {
		t.Fatalf("publish 401: %v", err)
	}
	return span.SpanContext(), ack
}

// ended returns the ended spans matching keep.
func (o *observed) ended(keep func(sdktrace.ReadOnlySpan) bool) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range o.spans.Ended() {
		if keep(s) {
			out = append(out, s)
		}
	}
	return out
}

func isProcess(s sdktrace.ReadOnlySpan) bool {
	return s.SpanKind() == trace.SpanKindConsumer && strings.HasPrefix(s.Name(), "process ")
}

func attrOf(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

func collect(t testing.TB, r *sdkmetric.ManualReader) metricdata.ResourceMetrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	return rm
}

func findMetric(rm metricdata.ResourceMetrics, name string) (metricdata.Metrics, bool) {
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m, true
			}
		}
	}
	return metricdata.Metrics{}, false
}

// counter sums the data points of an int64 counter whose attributes include
// all of want.
func counter(rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) int64 {
	m, ok := findMetric(rm, name)
	if !ok {
		return 0
	}
	var n int64
	for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
		if hasAll(dp.Attributes, want) {
			n += dp.Value
		}
	}
	return n
}

// histCount counts the recordings of a float64 histogram whose attributes
// include all of want.
func histCount(rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) uint64 {
	m, ok := findMetric(rm, name)
	if !ok {
		return 0
	}
	var n uint64
	for _, dp := range m.Data.(metricdata.Histogram[float64]).DataPoints {
		if hasAll(dp.Attributes, want) {
			n += dp.Count
		}
	}
	return n
}

// gauge returns the value of an int64 gauge with attributes including want.
func gauge(rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) (int64, bool) {
	m, ok := findMetric(rm, name)
	if !ok {
		return 0, false
	}
	for _, dp := range m.Data.(metricdata.Gauge[int64]).DataPoints {
		if hasAll(dp.Attributes, want) {
			return dp.Value, true
		}
	}
	return 0, false
}

func hasAll(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

func outcome(o string) attribute.KeyValue { return attribute.String("outcome", o) }

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
		"messaging.system":               "nats",
		"messaging.operation.type":       "process",
		"messaging.destination.name":     o.Subj.Event(events.Type401, key),
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
		for _, s := range byName("send auth.schedule.*.*.*") {
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

// stormPublish publishes n 401s for the same generation of key from
// runtimes first..first+n-1, every other one with the protocol's
// Nats-Msg-Id (the even ones) and the rest without (an older client). It
// returns the producer span contexts of the publishes the stream kept and
// how many it dropped as duplicates.
func (o *observed) stormPublish(t *testing.T, key events.Key, fp string, first, n int) (kept []trace.SpanContext, dups int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := first; i < first+n; i++ {
		wg.Go(func() {
			sc, ack := o.publish401(t, key, fp, fmt.Sprintf("runtime-%d", i), i%2 == 0)
			mu.Lock()
			defer mu.Unlock()
			if ack.Duplicate {
				dups++
				return
			}
			kept = append(kept, sc)
		})
	}
	wg.Wait()
	return kept, dups
}

// heldStorm starts a refresh of key whose token call waits in the server
// until release is called (at the latest when the test ends; later calls
// pass), then publishes n more 401s for the same token as stormPublish does
// and waits until every one the stream kept has joined the refresh. It
// returns the first publish's span context.
func (o *observed) heldStorm(t *testing.T, key events.Key, fp string, n int) (first trace.SpanContext, kept []trace.SpanContext, dups int, release func()) {
	t.Helper()
	held := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release) // the server cannot close while a call waits
	arrived := make(chan struct{}, 1)
	var calls atomic.Int32
	o.AS.OnToken(func(*http.Request) {
		if calls.Add(1) == 1 {
			arrived <- struct{}{}
			<-held
		}
	})
	first, ack := o.publish401(t, key, fp, "runtime-0", true)
	if ack.Duplicate {
		t.Fatal("the first publish was dropped as a duplicate")
	}
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the refresh never reached the token endpoint")
	}
	kept, dups = o.stormPublish(t, key, fp, 1, n)
	// Delivered is not enough: a delivered event may still wait in the
	// client's buffer. Wait until each one has joined.
	fleet.Eventually(t, 10*time.Second, "every kept publish joined the refresh", func() bool {
		return len(o.Logs.Records(map[string]string{"msg": "event joined the refresh in flight"})) == len(kept)
	})
	return first, kept, dups, release
}

// Done-when 2: 50 runtimes report the same 401 while its refresh is in
// flight, half with the protocol's Nats-Msg-Id and half without (an older
// client). The stream drops the duplicates of the first half; the other 25
// reach the pool, join the refresh in flight and are answered by it. One
// trace: one process span, the child of the first publish, with one link to
// each publish it answered; one token-endpoint call.
func TestStormTraces(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, nil)
	key, fp := o.registerOne(t, "acme.storm.github")

	const publishers = 50
	first, kept, dups, release := o.heldStorm(t, key, fp, publishers-1)
	if dups != publishers/2-1 {
		t.Errorf("duplicates = %d, want %d (all but one of the publishes with a Nats-Msg-Id)", dups, publishers/2-1)
	}
	ctx := context.Background()
	cons, err := o.JS.Consumer(ctx, o.Subj.EventsStream(), "refreshers")
	if err != nil {
		t.Fatal(err)
	}
	if ci, err := cons.Info(ctx); err != nil || ci.NumPending != 0 || ci.NumAckPending != len(kept)+1 {
		t.Fatalf("consumer before the refresh ends: %+v, %v; want 0 pending and %d unacknowledged", ci, err, len(kept)+1)
	}
	release()
	o.Settled(t)

	fleet.Eventually(t, 10*time.Second, "the process span ended", func() bool { return len(o.ended(isProcess)) > 0 })
	procs := o.ended(isProcess)
	if len(procs) != 1 {
		for _, p := range procs {
			t.Logf("process span %s outcome %s attempt %s", p.Name(), attrOf(p, "authbus.outcome"), attrOf(p, "authbus.attempt"))
		}
		t.Fatalf("process spans = %d, want 1 (the joined events are links, not spans of their own)", len(procs))
	}
	proc := procs[0]
	if got := attrOf(proc, "authbus.outcome"); got != "rotated" {
		t.Errorf("process span outcome = %q, want rotated", got)
	}
	if proc.SpanContext().TraceID() != first.TraceID() || proc.Parent().SpanID() != first.SpanID() {
		t.Errorf("process span is in trace %s under %s, want the first publish's trace %s under %s",
			proc.SpanContext().TraceID(), proc.Parent().SpanID(), first.TraceID(), first.SpanID())
	}
	want := map[[2]string]bool{}
	for _, sc := range kept {
		want[[2]string{sc.TraceID().String(), sc.SpanID().String()}] = true
	}
	got := map[[2]string]bool{}
	for _, l := range proc.Links() {
		got[[2]string{l.SpanContext.TraceID().String(), l.SpanContext.SpanID().String()}] = true
	}
	if !maps.Equal(got, want) {
		t.Errorf("process span links to %d publishes (%d distinct), want the %d other kept publishes", len(proc.Links()), len(got), len(want))
	}
	calls := o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.SpanKind() == trace.SpanKindClient })
	if len(calls) != 1 || calls[0].SpanContext().TraceID() != first.TraceID() {
		t.Errorf("token-endpoint client spans = %d, want 1 in the first publish's trace", len(calls))
	}
	if got := o.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}

	rm := collect(t, o.reader)
	if got := counter(rm, "authbus.events.processed", outcome("rotated")); got != 1 {
		t.Errorf("rotated counted %d, want 1", got)
	}
	if got := counter(rm, "authbus.events.processed", outcome("stale")); got != int64(len(kept)) {
		t.Errorf("stale counted %d, want %d (one per joined event)", got, len(kept))
	}
	if dups+1+len(kept) != publishers {
		t.Errorf("duplicates %d + rotated 1 + joined %d = %d, want %d publishes accounted for", dups, len(kept), dups+1+len(kept), publishers)
	}
	if got := counter(rm, "authbus.lease.contention"); got != 0 {
		t.Errorf("lease contention counted %d, want 0: the storm joined the refresh instead", got)
	}
	recs := o.Logs.Records(map[string]string{"msg": "event processed", "outcome": "stale"})
	for _, r := range recs {
		if r["trace_id"] != first.TraceID().String() {
			t.Errorf("a joined event was logged under trace %v, want the refresh's %s", r["trace_id"], first.TraceID())
			break
		}
	}
}

// Events that joined a refresh which failed (here: the token endpoint did
// not answer within TokenTimeout) are not answered by it: they go back to
// the stream and are decided on their own, and the next attempt refreshes
// the credential with one more call, without a reuse.
func TestStormJoinsFailedRefresh(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, func(c *workers.Config) { c.TokenTimeout = 2 * time.Second })
	key, fp := o.registerOne(t, "acme.storm.github")
	w := o.Watch(t, key)

	// The first call hangs until the test ends: the server never redeems
	// the refresh token it carries.
	_, kept, _, _ := o.heldStorm(t, key, fp, 9)
	w.WaitFor(t, "the rotation after the failed call", fleet.RotatedVersion(2))
	o.Settled(t)
	if got := o.AS.Calls(); got != 2 {
		t.Errorf("token-endpoint calls = %d, want 2 (the one that hung, then the refresh)", got)
	}
	if got := o.AS.Reuses(); got != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", got)
	}
	backs := o.Logs.Records(map[string]string{"msg": "event processed", "detail": "the refresh it joined ended transient"})
	if len(backs) != len(kept) {
		t.Errorf("joined events sent back after the failed call = %d, want %d", len(backs), len(kept))
	}
}

// A pool told to stop while events wait on its refresh finishes the
// refresh and settles every joined event before Run returns: none is left
// unacknowledged for a redelivery after AckWait.
func TestShutdownSettlesJoinedEvents(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 1, nil)
	key, fp := o.registerOne(t, "acme.storm.github")
	_, kept, _, release := o.heldStorm(t, key, fp, 9)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		o.Pools[0].Stop(t)
	}()
	// Stopping begins with the token service; then Stop waits for the
	// refresh in flight: let it finish.
	fleet.Eventually(t, 5*time.Second, "the pool's token service stopped", func() bool {
		_, err := o.NC.Request(o.Subj.Token(key), nil, 200*time.Millisecond)
		return errors.Is(err, nats.ErrNoResponders)
	})
	release()
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("the pool did not stop")
	}
	cons, err := o.JS.Consumer(context.Background(), o.Subj.EventsStream(), "refreshers")
	if err != nil {
		t.Fatal(err)
	}
	ci, err := cons.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ci.NumPending != 0 || ci.NumAckPending != 0 || ci.NumRedelivered != 0 {
		t.Errorf("after the stop: %d pending, %d unacknowledged, %d redelivered; want 0, 0, 0", ci.NumPending, ci.NumAckPending, ci.NumRedelivered)
	}
	rm := collect(t, o.reader)
	if got := counter(rm, "authbus.events.processed", outcome("stale")); got != int64(len(kept)) {
		t.Errorf("joined events answered = %d, want %d", got, len(kept))
	}
	if got := counter(rm, "authbus.events.processed", outcome("rotated")); got != 1 {
		t.Errorf("rotated = %d, want 1", got)
	}
}

// The same storm across three pools and without holding the token endpoint:
// events reach pools before, during and after the refresh. Whatever each
// one meets (a refresh in flight in its own pool, a lease held by another,
// a rotated credential), every kept publish is answered exactly once and
// traced: the process span of its own trace settles it, or the refresh it
// joined links to it. Exactly one token-endpoint call.
func TestStormTracesAcrossPools(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 3, nil)
	key, fp := o.registerOne(t, "acme.storm.github")

	const publishers = 50
	kept, dups := o.stormPublish(t, key, fp, 0, publishers)
	if dups != publishers/2-1 {
		t.Errorf("duplicates = %d, want %d (all but one of the publishes with a Nats-Msg-Id)", dups, publishers/2-1)
	}
	o.Settled(t)

	keptTrace := map[trace.TraceID]bool{}
	for _, sc := range kept {
		keptTrace[sc.TraceID()] = true
	}
	// Settling acks before the process span ends: wait for the last ones.
	final := map[trace.TraceID]string{} // trace → the outcome that settled it
	linked := map[trace.TraceID]bool{}  // traces the refresh answered by a link
	fleet.Eventually(t, 10*time.Second, "every kept publish settled by a span or a link", func() bool {
		clear(final)
		clear(linked)
		for _, s := range o.ended(isProcess) {
			if out := attrOf(s, "authbus.outcome"); out != "lease_held" {
				final[s.SpanContext().TraceID()] = out
			}
			for _, l := range s.Links() {
				linked[l.SpanContext.TraceID()] = true
			}
		}
		return len(final)+len(linked) == len(kept)
	})
	rotatedTraces := 0
	for id, out := range final {
		if !keptTrace[id] {
			t.Errorf("a process span in trace %s, which is no kept publish", id)
		}
		if linked[id] {
			t.Errorf("trace %s was settled by its own process span (%s) and joined a refresh too", id, out)
		}
		switch out {
		case "rotated":
			rotatedTraces++
		case "stale":
		default:
			t.Errorf("trace %s settled as %s, want rotated or stale", id, out)
		}
	}
	for id := range linked {
		if !keptTrace[id] {
			t.Errorf("a link to trace %s, which is no kept publish", id)
		}
	}
	if rotatedTraces != 1 {
		t.Errorf("traces that rotated = %d, want 1", rotatedTraces)
	}
	calls := o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.SpanKind() == trace.SpanKindClient })
	if len(calls) != 1 || final[calls[0].SpanContext().TraceID()] != "rotated" {
		t.Errorf("token-endpoint client spans = %d, want 1 in the trace that rotated", len(calls))
	}
	if got := o.AS.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}

	rm := collect(t, o.reader)
	stale := counter(rm, "authbus.events.processed", outcome("stale"))
	if got := counter(rm, "authbus.events.processed", outcome("rotated")); got != 1 {
		t.Errorf("rotated counted %d, want 1", got)
	}
	if dups+1+int(stale) != publishers {
		t.Errorf("duplicates %d + rotated 1 + stale %d = %d, want %d publishes accounted for",
			dups, stale, dups+1+int(stale), publishers)
	}
	held := len(o.ended(func(s sdktrace.ReadOnlySpan) bool {
		return isProcess(s) && attrOf(s, "authbus.outcome") == "lease_held"
	}))
	if got := counter(rm, "authbus.lease.contention"); got != int64(held) {
		t.Errorf("lease contention counted %d, but %d deliveries found the lease held", got, held)
	}
}

// Done-when 3: each outcome the pool reaches is counted under its name, and
// the duration histograms record; token-endpoint calls are recorded by
// result, terminated events by reason.
func TestOutcomeMetrics(t *testing.T) {
	type env struct {
		o   *observed
		key events.Key
		tok authtest.Tokens
		fp  string
	}
	for _, tc := range []struct {
		name        string
		tune        func(*workers.Config)
		unregisted  bool
		trigger     func(t *testing.T, e env)
		want        string
		tokenResult string // "" when no token-endpoint call is expected
		terminated  string // reason, when the event is terminated
	}{
		{name: "rotated", want: "rotated", tokenResult: "success",
			trigger: func(t *testing.T, e env) { e.o.publish401(t, e.key, e.fp, "rt", true) }},
		{name: "stale", want: "stale",
			trigger: func(t *testing.T, e env) { e.o.publish401(t, e.key, events.Fingerprint("an-older-token"), "rt", true) }},
		{name: "needs_reauth", want: "needs_reauth", tokenResult: "permanent",
			trigger: func(t *testing.T, e env) {
				e.o.AS.Revoke(e.tok.RefreshToken)
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "transient", want: "transient", tokenResult: "transient",
			trigger: func(t *testing.T, e env) {
				e.o.AS.Fail(1, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "breaker_open", want: "breaker_open", tokenResult: "transient",
			tune: func(c *workers.Config) { c.BreakerFailures = 1; c.BreakerOpenFor = time.Minute },
			trigger: func(t *testing.T, e env) {
				e.o.AS.SetDown(true)
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "lease_held", want: "lease_held",
			trigger: func(t *testing.T, e env) {
				lease, err := e.o.Pools[0].Pool.Leases().Claim(context.Background(), e.key, "another-refresher", kv.Read{})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = lease.Release(context.Background()) })
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "lost_race", want: "lost_race", tokenResult: "permanent",
			trigger: func(t *testing.T, e env) {
				var once atomic.Bool
				e.o.AS.OnToken(func(*http.Request) {
					if !once.CompareAndSwap(false, true) {
						return
					}
					peer := spendOutsideAuthbus(t, e.o.Fleet, e.tok.RefreshToken)
					c, rev, err := e.o.Store.Get(context.Background(), e.key)
					if err != nil {
						t.Error(err)
						return
					}
					c.Version++
					c.AccessToken, c.RefreshToken = kv.Secret(peer.AccessToken), kv.Secret(peer.RefreshToken)
					c.Fingerprint = events.Fingerprint(peer.AccessToken)
					if _, err := e.o.Store.Update(context.Background(), c, rev); err != nil {
						t.Error(err)
					}
				})
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "discarded", want: "discarded", tokenResult: "success",
			trigger: func(t *testing.T, e env) {
				relogin := e.o.AS.Issue(fleet.ClientID)
				var once atomic.Bool
				e.o.AS.OnToken(func(*http.Request) {
					if once.CompareAndSwap(false, true) {
						e.o.Register(t, e.key, relogin, nil)
					}
				})
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "lease_lost", want: "lease_lost", tokenResult: "permanent",
			trigger: func(t *testing.T, e env) {
				// The refresh stalls in the token call long enough for another
				// refresher to take the lease; then the server refuses.
				arrived, release := make(chan struct{}), make(chan struct{})
				var once atomic.Bool
				e.o.AS.OnToken(func(*http.Request) {
					if once.CompareAndSwap(false, true) {
						close(arrived)
						<-release
					}
				})
				var closeRelease sync.Once
				t.Cleanup(func() { closeRelease.Do(func() { close(release) }) })
				e.o.publish401(t, e.key, e.fp, "rt", true)
				<-arrived
				ctx := context.Background()
				leases, err := e.o.JS.KeyValue(ctx, e.o.Subj.LeasesBucket())
				if err != nil {
					t.Fatal(err)
				}
				if err := leases.Delete(ctx, e.key.String()); err != nil {
					t.Fatal(err)
				}
				other, err := e.o.Pools[0].Pool.Leases().Claim(ctx, e.key, "another-refresher", kv.Read{})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = other.Release(context.Background()) })
				fleet.Eventually(t, 10*time.Second, "the pool noticed its lease is gone", func() bool {
					return strings.Contains(e.o.Logs.String(), "lease lost during a refresh")
				})
				e.o.AS.Revoke(e.tok.RefreshToken)
				closeRelease.Do(func() { close(release) })
			}},
		{name: "nats_unavailable", want: "nats_unavailable",
			trigger: func(t *testing.T, e env) {
				// The credential bucket is gone (an operator deleted it): reads fail.
				if err := e.o.JS.DeleteKeyValue(context.Background(), e.o.Subj.CredentialsBucket()); err != nil {
					t.Fatal(err)
				}
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "store_failed", want: "store_failed", tokenResult: "success",
			trigger: func(t *testing.T, e env) {
				// The bucket disappears while the token endpoint answers: the
				// new tokens cannot be stored (retried for the lease's TTL).
				var once atomic.Bool
				e.o.AS.OnToken(func(*http.Request) {
					if once.CompareAndSwap(false, true) {
						if err := e.o.JS.DeleteKeyValue(context.Background(), e.o.Subj.CredentialsBucket()); err != nil {
							t.Error(err)
						}
					}
				})
				e.o.publish401(t, e.key, e.fp, "rt", true)
			}},
		{name: "not_due", want: "not_due",
			trigger: func(t *testing.T, e env) {
				data, err := events.Encode(e.key, "test", events.Expiring{Fingerprint: e.fp, ExpiresAt: time.Now().Add(time.Hour)})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := e.o.JS.Publish(context.Background(), e.o.Subj.Event(events.TypeExpiring, e.key), data); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "unknown_credential", want: "unknown_credential", unregisted: true, terminated: "unknown_credential",
			trigger: func(t *testing.T, e env) { e.o.publish401(t, e.key, e.fp, "rt", true) }},
		{name: "bad_input", want: "bad_input", terminated: "bad_input",
			trigger: func(t *testing.T, e env) {
				if _, err := e.o.JS.Publish(context.Background(), e.o.Subj.Event(events.Type401, e.key), []byte("not json")); err != nil {
					t.Fatal(err)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := setupObserved(t)
			o.start(t, 1, tc.tune)
			e := env{o: o, key: fleet.MustKey(t, "acme.metrics.github"), tok: o.AS.Issue(fleet.ClientID)}
			e.fp = events.Fingerprint(e.tok.AccessToken)
			if !tc.unregisted {
				o.Register(t, e.key, e.tok, nil)
			}
			tc.trigger(t, e)

			var rm metricdata.ResourceMetrics
			fleet.Eventually(t, 20*time.Second, "outcome "+tc.want+" counted and its duration recorded", func() bool {
				rm = collect(t, o.reader)
				// The counter and the histogram are recorded one after
				// the other: wait for both.
				return counter(rm, "authbus.events.processed", outcome(tc.want)) >= 1 &&
					histCount(rm, "authbus.event.duration", outcome(tc.want)) >= 1
			})
			calls := histCount(rm, "authbus.token_endpoint.duration", attribute.String("endpoint", o.AS.TokenURL()))
			if tc.tokenResult == "" && calls != 0 {
				t.Errorf("token-endpoint duration recorded %d calls, want none", calls)
			}
			if tc.tokenResult != "" && histCount(rm, "authbus.token_endpoint.duration", attribute.String("result", tc.tokenResult)) == 0 {
				t.Errorf("token-endpoint duration has no %s recording", tc.tokenResult)
			}
			if tc.terminated != "" {
				if got := counter(rm, "authbus.events.terminated", attribute.String("reason", tc.terminated)); got != 1 {
					t.Errorf("terminated{reason=%s} = %d, want 1", tc.terminated, got)
				}
			}
			switch tc.want {
			case "lease_held":
				if counter(rm, "authbus.lease.contention") == 0 {
					t.Error("lease contention not counted")
				}
			case "breaker_open":
				if v, ok := gauge(rm, "authbus.breaker.state", attribute.String("endpoint", o.AS.TokenURL())); !ok || v != 2 {
					t.Errorf("breaker state gauge = %d (observed %v), want 2 (open)", v, ok)
				}
				o.AS.SetDown(false)
			}
		})
	}
}

// The pending gauges come from the consumer's info, fetched at most once
// per few seconds however often metrics are collected.
func TestConsumerPendingGauges(t *testing.T) {
	o := setupObserved(t)
	key := fleet.MustKey(t, "acme.pending.github")
	nc := natstest.Connect(t, o.Srv)
	cfg := o.TestConfig()
	cfg.MeterProvider = o.mp
	// A pool that is created but not running: events stay pending.
	if _, err := workers.New(context.Background(), nc, cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		o.Publish401(t, key, events.Fingerprint(fmt.Sprint("token-", i)), "rt", true)
	}
	// The server counts pending messages asynchronously: wait until it
	// says 3 before the first collection fills the cache.
	serverCounts := func(n uint64) {
		t.Helper()
		fleet.Eventually(t, 5*time.Second, fmt.Sprintf("the server counts %d pending", n), func() bool {
			c, err := o.JS.Consumer(context.Background(), o.Subj.EventsStream(), "refreshers")
			if err != nil {
				return false
			}
			ci, err := c.Info(context.Background())
			return err == nil && ci.NumPending == n
		})
	}
	serverCounts(3)
	rm := collect(t, o.reader)
	if v, ok := gauge(rm, "authbus.consumer.pending"); !ok || v != 3 {
		t.Errorf("pending = %d (observed %v), want 3", v, ok)
	}
	if v, ok := gauge(rm, "authbus.consumer.ack_pending"); !ok || v != 0 {
		t.Errorf("ack_pending = %d (observed %v), want 0", v, ok)
	}
	// Within the cache lifetime a new event does not show: no API request
	// per collection.
	o.Publish401(t, key, events.Fingerprint("token-3"), "rt", true)
	serverCounts(4)
	if v, _ := gauge(collect(t, o.reader), "authbus.consumer.pending"); v != 3 {
		t.Errorf("pending = %d right after the previous collection, want the cached 3", v)
	}
}

// Done-when 4: no token or secret reaches a span name, attribute, event,
// link or status, nor a metric attribute, on the paths that handle them:
// registration, rotation, a transient failure, and needs_reauth.
func TestNoSecretInTelemetry(t *testing.T) {
	o := setupObserved(t)
	o.start(t, 2, nil)
	key := fleet.MustKey(t, "acme.canary.github")
	tok := o.AS.Issue(fleet.ClientID)
	o.Register(t, key, tok, nil)
	w := o.Watch(t, key)
	o.AS.Fail(1, http.StatusServiceUnavailable, `{"error":"temporarily_unavailable"}`, nil)
	o.publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	rot := w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	newRT := o.Cred(t, key).RefreshToken.Reveal()
	o.AS.Revoke(newRT)
	o.publish401(t, key, rot.Rotated.Fingerprint, "rt", true)
	w.WaitFor(t, "needs_reauth", func(ev *events.Event) bool { return ev.NeedsReauth != nil })
	o.Settled(t)
	fleet.Eventually(t, 10*time.Second, "the needs_reauth process span ended", func() bool {
		return len(o.ended(func(s sdktrace.ReadOnlySpan) bool { return attrOf(s, "authbus.outcome") == "needs_reauth" })) > 0
	})

	canaries := []string{tok.AccessToken, tok.RefreshToken, rot.Rotated.AccessToken, newRT, fleet.ClientSecret}
	var texts []string
	for _, s := range o.spans.Ended() {
		texts = append(texts, s.Name(), s.Status().Description)
		texts = append(texts, kvTexts(s.Attributes())...)
		for _, ev := range s.Events() {
			texts = append(texts, ev.Name)
			texts = append(texts, kvTexts(ev.Attributes)...)
		}
		for _, l := range s.Links() {
			texts = append(texts, kvTexts(l.Attributes)...)
		}
	}
	rm := collect(t, o.reader)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			texts = append(texts, fmt.Sprintf("%+v", m.Data))
		}
	}
	all := strings.Join(texts, "\n")
	if !strings.Contains(all, events.Fingerprint(tok.AccessToken)) || !strings.Contains(all, "POST") {
		t.Fatal("the telemetry checked does not hold the fingerprints and calls it should: the check would prove nothing")
	}
	for _, c := range canaries {
		if strings.Contains(all, c) {
			t.Errorf("a span or metric holds a secret (%.6s…)", c)
		}
	}
	if n := len(o.ended(func(s sdktrace.ReadOnlySpan) bool { return s.Status().Code == codes.Error })); n == 0 {
		t.Error("no span recorded the 503: the failure path was not checked")
	}
}

func kvTexts(kvs []attribute.KeyValue) []string {
	out := make([]string, 0, len(kvs))
	for _, kv := range kvs {
		out = append(out, string(kv.Key)+"="+kv.Value.Emit())
	}
	return out
}

// Done-when 5: /metrics, scraped from the operations listener, serves the
// authbus metrics under their Prometheus names; /readyz turns not-ready when
// the pool's NATS connection is closed.
func TestMetricsEndpointAndReadiness(t *testing.T) {
	for _, k := range []string{"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"} {
		t.Setenv(k, "")
	}
	b := fleet.Setup(t)
	prov, shutdown, err := telemetry.Setup(context.Background(), telemetry.Config{Prometheus: true, KeepGlobals: true, InstanceID: "pool-0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shutdown(context.Background()) })
	b.StartPools(t, 1, func(c *workers.Config) { c.TracerProvider, c.MeterProvider = prov.TracerProvider, prov.MeterProvider })
	key := fleet.MustKey(t, "acme.scrape.github")
	tok := b.AS.Issue(fleet.ClientID)
	b.Register(t, key, tok, nil)
	w := b.Watch(t, key)
	b.Publish401(t, key, events.Fingerprint(tok.AccessToken), "rt", true)
	w.WaitFor(t, "rotation", fleet.RotatedVersion(2))
	// A bad event and a 401 that finds the lease held, so that every
	// metric the dashboard shows has a series.
	if _, err := b.JS.Publish(context.Background(), b.Subj.Event(events.Type401, key), []byte("not json")); err != nil {
		t.Fatal(err)
	}
	held := fleet.MustKey(t, "acme.held.github")
	heldTok := b.AS.Issue(fleet.ClientID)
	b.Register(t, held, heldTok, nil)
	lease, err := b.Pools[0].Pool.Leases().Claim(context.Background(), held, "another-refresher", kv.Read{})
	if err != nil {
		t.Fatal(err)
	}
	b.Publish401(t, held, events.Fingerprint(heldTok.AccessToken), "rt", true)
	fleet.Eventually(t, 10*time.Second, "lease contention logged", func() bool {
		return len(b.Logs.Records(map[string]string{"msg": "event processed", "outcome": "lease_held"})) > 0
	})
	if err := lease.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Settled(t)

	// A second pool, created but not running, on a connection of its own:
	// its readiness is what /readyz reports.
	nc := natstest.Connect(t, b.Srv)
	ready, err := workers.New(context.Background(), nc, b.TestConfig())
	if err != nil {
		t.Fatal(err)
	}
	ops, err := telemetry.StartOps(telemetry.OpsConfig{Addr: "127.0.0.1:0", Metrics: prov.MetricsHandler, Ready: ready.Ready})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ops.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	})
	client := &http.Client{Timeout: 5 * time.Second}
	t.Cleanup(client.CloseIdleConnections)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get("http://" + ops.Addr() + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}

	var body string
	fleet.Eventually(t, 10*time.Second, "the rotation in /metrics", func() bool {
		_, body = get("/metrics")
		return strings.Contains(body, `authbus_events_processed_total{`) && strings.Contains(body, `outcome="rotated"`)
	})
	// Every metric the Grafana dashboard queries is served under that name.
	dashboard, err := os.ReadFile("../deploy/grafana/authbus.json")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, expr := range regexp.MustCompile(`"expr": "([^"]*)"`).FindAllStringSubmatch(string(dashboard), -1) {
		names = append(names, regexp.MustCompile(`authbus_[a-z_]+`).FindAllString(expr[1], -1)...)
	}
	if len(names) < 5 {
		t.Fatalf("the dashboard queries only %v", names)
	}
	var missing []string
	fleet.Eventually(t, 10*time.Second, "/metrics serves every metric the dashboard queries", func() bool {
		_, body = get("/metrics")
		missing = slices.DeleteFunc(slices.Clone(names), func(n string) bool { return strings.Contains(body, "\n"+n+"{") })
		return len(missing) == 0
	})
	for _, want := range []string{
		`authbus_event_duration_seconds_bucket{`,
		`authbus_token_endpoint_duration_seconds_count{endpoint="` + b.AS.TokenURL() + `"`,
		`authbus_breaker_state{endpoint="` + b.AS.TokenURL() + `"`,
		`authbus_consumer_pending{`,
		`authbus_consumer_ack_pending{`,
		`http_client_request_duration_seconds_bucket{`,
		`target_info{`,
		`service_name="authbus-refresher"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(body, tok.RefreshToken) || strings.Contains(body, fleet.ClientSecret) {
		t.Error("/metrics holds a secret")
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d %q with NATS connected", code, body)
	}
	nc.Close()
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "CLOSED") {
		t.Errorf("/readyz = %d %q after the connection closed, want 503 naming it", code, body)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d after the connection closed: the process is still alive", code)
	}
}

// BenchmarkStormTracing is the overhead of tracing on the pipeline: the
// storm of BenchmarkStorm (three pools, K credentials, N runtimes each)
// with tracing off (the no-op provider a refresher gets when no OTEL_* is
// set) and with every span recorded and batched to an in-memory exporter.
// In both, every runtime publishes with a traceparent of its own (made
// without a tracer, so the runtimes cost the same): only the refreshers'
// tracing differs. Run both in the same invocation and compare events/s:
//
//	go test -run '^$' -bench StormTracing -benchtime 1x -count 3 ./workers/
//
// With msgid, the stream drops 19 of every 20 publishes (the protocol's
// Nats-Msg-Id), so the refreshers see one event per credential; without,
// every publish reaches a refresher (one rotation, the rest stale), which
// is where tracing costs most.
func BenchmarkStormTracing(b *testing.B) {
	for _, size := range []struct {
		creds, publishers int
		msgID             bool
	}{{1000, 20, true}, {200, 20, false}} {
		for _, mode := range []string{"off", "memory"} {
			b.Run(fmt.Sprintf("tracing=%s/msgid=%v/creds=%d/publishers=%d", mode, size.msgID, size.creds, size.publishers), func(b *testing.B) {
				for range b.N {
					runTracedStorm(b, mode == "memory", size.msgID, size.creds, size.publishers)
				}
			})
		}
	}
}

func runTracedStorm(b *testing.B, traced, msgID bool, creds, publishers int) {
	b.StopTimer()
	bd := fleet.Setup(b)
	var tp trace.TracerProvider = tracenoop.NewTracerProvider()
	var exp *tracetest.InMemoryExporter
	if traced {
		exp = tracetest.NewInMemoryExporter()
		sdk := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
		b.Cleanup(func() { _ = sdk.Shutdown(context.Background()) })
		tp = sdk
	}
	bd.StartPools(b, 3, func(c *workers.Config) { c.TracerProvider = tp })
	keys := make([]events.Key, creds)
	fps := make([]string, creds)
	for i := range creds {
		keys[i] = fleet.MustKey(b, fmt.Sprintf("storm.user%d.api", i))
		tok := bd.AS.Issue(fleet.ClientID)
		bd.Register(b, keys[i], tok, nil)
		fps[i] = events.Fingerprint(tok.AccessToken)
	}
	datas := make([][]byte, creds)
	for i := range creds {
		d, err := events.Encode(keys[i], "bench", events.Unauthorized{Fingerprint: fps[i], Runtime: "rt", Status: 401})
		if err != nil {
			b.Fatal(err)
		}
		datas[i] = d
	}
	rotations := bd.WatchRotations(b, 2, creds)

	b.StartTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			for i := range creds {
				i := (i + p*creds/publishers) % creds
				var tid trace.TraceID
				var sid trace.SpanID
				binary.LittleEndian.PutUint64(tid[:8], rand.Uint64())
				binary.LittleEndian.PutUint64(tid[8:], rand.Uint64())
				binary.LittleEndian.PutUint64(sid[:], rand.Uint64())
				ctx := trace.ContextWithRemoteSpanContext(context.Background(),
					trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled}))
				msg := nats.NewMsg(bd.Subj.Event(events.Type401, keys[i]))
				msg.Data = datas[i]
				msg.Header = telemetry.Inject(ctx, msg.Header)
				var opts []jetstream.PublishOpt
				if msgID {
					opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, keys[i], fps[i])))
				}
				if _, err := bd.JS.PublishMsg(ctx, msg, opts...); err != nil {
					b.Error(err)
				}
			}
		})
	}
	wg.Wait()
	published := time.Since(start)
	select {
	case <-rotations.Done:
	case <-time.After(2 * time.Minute):
		b.Fatalf("not every one of %d credentials rotated within 2m", creds)
	}
	// Until the refreshers have answered every event that reached them.
	bd.Settled(b)
	total := time.Since(start)
	b.StopTimer()
	evs := float64(creds * publishers)
	b.ReportMetric(evs/published.Seconds(), "published/s")
	b.ReportMetric(evs/total.Seconds(), "events/s")
	b.ReportMetric(float64(creds)/total.Seconds(), "rotations/s")
	b.ReportMetric(float64(bd.AS.Calls()), "calls")
	if exp != nil {
		if sdk, ok := tp.(*sdktrace.TracerProvider); ok {
			_ = sdk.ForceFlush(context.Background())
		}
		b.ReportMetric(float64(len(exp.GetSpans())), "spans")
	}
}
