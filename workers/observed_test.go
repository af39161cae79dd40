package workers_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
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
	// Without Nats-Msg-Id: straight into the work queue, as reports the
	// intake cannot de-duplicate (outside the duplicate window) reach it.
	msg := nats.NewMsg(o.Subj.Work(events.Type401, key))
	var opts []jetstream.PublishOpt
	if withMsgID {
		msg.Subject = o.Subj.Event(events.Type401, key)
		opts = append(opts, jetstream.WithMsgID(events.MsgID(events.Type401, key, fp)))
	}
	msg.Data = data
	msg.Header = telemetry.Inject(ctx, msg.Header)
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
