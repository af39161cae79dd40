package telemetry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/slogtest"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/authbus/authbus/telemetry"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Idle keep-alive connections of http.DefaultClient end with
		// their server; the runtime may not have reaped them yet.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// clearOTelEnv makes the test independent of the developer's shell.
func clearOTelEnv(t *testing.T) {
	for _, k := range []string{"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_SDK_DISABLED",
		"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_PROPAGATORS"} {
		t.Setenv(k, "")
	}
}

// collector is a stand-in OTLP/HTTP endpoint that accepts every export.
func collector(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func setup(t *testing.T, cfg telemetry.Config) *telemetry.Providers {
	t.Helper()
	cfg.KeepGlobals = true
	p, shutdown, err := telemetry.Setup(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() {
		if err := shutdown(context.Background()); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return p
}

func recording(p *telemetry.Providers) bool {
	_, span := p.TracerProvider.Tracer("t").Start(context.Background(), "probe")
	defer span.End()
	return span.IsRecording()
}

// With no OTEL_* variable set, nothing is exported and spans are not even
// recorded; an exporter variable or an OTLP endpoint turns tracing on.
func TestSetupExportsOnlyWhenAsked(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     map[string]string
		tracing bool
	}{
		{"nothing set", nil, false},
		{"console", map[string]string{"OTEL_TRACES_EXPORTER": "console"}, true},
		{"none", map[string]string{"OTEL_TRACES_EXPORTER": "none"}, false},
		{"OTLP endpoint alone means otlp", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": collector(t)}, true},
		{"SDK disabled wins", map[string]string{"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			p := setup(t, telemetry.Config{})
			if p.Tracing != tc.tracing || recording(p) != tc.tracing {
				t.Errorf("Tracing = %v, spans recording = %v; want %v", p.Tracing, recording(p), tc.tracing)
			}
			if p.MetricsHandler != nil {
				t.Error("MetricsHandler set without Config.Prometheus")
			}
		})
	}
}

func TestSetupRejectsUnknownExporterNamingTheVariable(t *testing.T) {
	clearOTelEnv(t)
	t.Setenv("OTEL_TRACES_EXPORTER", "zipkinn")
	_, _, err := telemetry.Setup(context.Background(), telemetry.Config{KeepGlobals: true})
	if err == nil || !strings.Contains(err.Error(), "OTEL_TRACES_EXPORTER") {
		t.Fatalf("err = %v, want one naming OTEL_TRACES_EXPORTER", err)
	}
}

// The Prometheus handler exposes the meter provider's instruments with the
// resource (service name, version, instance id) in target_info.
func TestPrometheusHandlerAndResource(t *testing.T) {
	for _, tc := range []struct {
		name, envName, wantName string
	}{
		{"default service name", "", "authbus-refresher"},
		{"OTEL_SERVICE_NAME overrides", "refresher-eu", "refresher-eu"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			t.Setenv("OTEL_SERVICE_NAME", tc.envName)
			p := setup(t, telemetry.Config{Prometheus: true, ServiceVersion: "1.2.3", InstanceID: "pod-7"})
			c, err := p.MeterProvider.Meter("test").Int64Counter("authbus.test.things", metric.WithUnit("{thing}"))
			if err != nil {
				t.Fatal(err)
			}
			c.Add(context.Background(), 3)
			body := scrape(t, p.MetricsHandler)
			for _, want := range []string{
				"authbus_test_things_total",
				`service_name="` + tc.wantName + `"`,
				`service_version="1.2.3"`,
				`service_instance_id="pod-7"`,
				"go_goroutines",
			} {
				if !strings.Contains(body, want) {
					t.Errorf("/metrics lacks %s:\n%s", want, body)
				}
			}
		})
	}
}

func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "/metrics", nil)
	rec := &responseRecorder{header: http.Header{}}
	h.ServeHTTP(rec, req)
	return rec.body.String()
}

type responseRecorder struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (r *responseRecorder) Header() http.Header         { return r.header }
func (r *responseRecorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *responseRecorder) WriteHeader(code int)        { r.code = code }

func TestLoggerAddsTraceAndSpanIDsInsideSpans(t *testing.T) {
	var buf bytes.Buffer
	log, err := telemetry.NewLogger(&buf, "json", "info")
	if err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider()
	defer tp.Shutdown(context.Background())
	ctx, span := tp.Tracer("t").Start(context.Background(), "work")
	log.InfoContext(ctx, "inside", "k", "v")
	log.With("a", 1).WithGroup("g").InfoContext(ctx, "grouped")
	span.End()
	log.InfoContext(context.Background(), "outside")

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want 3:\n%s", len(lines), buf.String())
	}
	var in, grouped, out map[string]any
	for i, v := range []*map[string]any{&in, &grouped, &out} {
		if err := json.Unmarshal([]byte(lines[i]), v); err != nil {
			t.Fatal(err)
		}
	}
	sc := span.SpanContext()
	if in["trace_id"] != sc.TraceID().String() || in["span_id"] != sc.SpanID().String() {
		t.Errorf("record inside the span: trace_id %v span_id %v, want %s %s", in["trace_id"], in["span_id"], sc.TraceID(), sc.SpanID())
	}
	if g, _ := grouped["g"].(map[string]any); g == nil || g["trace_id"] != sc.TraceID().String() {
		t.Errorf("grouped record lacks the trace id: %v", grouped)
	}
	if _, ok := out["trace_id"]; ok {
		t.Errorf("record outside any span has a trace_id: %v", out)
	}
}

func TestLoggerRejectsBadSettings(t *testing.T) {
	if _, err := telemetry.NewLogger(io.Discard, "xml", "info"); err == nil || !strings.Contains(err.Error(), "text or json") {
		t.Errorf("format xml: err %v", err)
	}
	if _, err := telemetry.NewLogger(io.Discard, "text", "loud"); err == nil || !strings.Contains(err.Error(), "debug, info") {
		t.Errorf("level loud: err %v", err)
	}
}

// Trace context crosses NATS in the traceparent header: what one side
// injects, the other extracts as the remote parent.
func TestInjectExtractRoundTrip(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background())
	ctx, span := tp.Tracer("t").Start(context.Background(), "publish")
	h := telemetry.Inject(ctx, nil)
	span.End()
	if h.Get("traceparent") == "" {
		t.Fatalf("no traceparent header: %v", h)
	}
	got := trace.SpanContextFromContext(telemetry.Extract(context.Background(), nats.Header(h)))
	if !got.IsRemote() || got.TraceID() != span.SpanContext().TraceID() || got.SpanID() != span.SpanContext().SpanID() {
		t.Errorf("extracted %v, want the remote %v", got, span.SpanContext())
	}
	if h := telemetry.Inject(context.Background(), nil); len(h) != 0 {
		t.Errorf("no span, yet headers %v", h)
	}
}

func TestOpsEndpointsAndShutdown(t *testing.T) {
	clearOTelEnv(t)
	p := setup(t, telemetry.Config{Prometheus: true})
	var notReady error
	ops, err := telemetry.StartOps(telemetry.OpsConfig{
		Addr:    "127.0.0.1:0",
		Metrics: p.MetricsHandler,
		Ready:   func(context.Context) error { return notReady },
	})
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + ops.Addr()
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz = %d while ready", code)
	}
	notReady = errors.New("NATS connection is CLOSED")
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "CLOSED") {
		t.Errorf("/readyz = %d %q while not ready, want 503 with the reason", code, body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "go_goroutines") {
		t.Errorf("/metrics = %d", code)
	}

	// The address is taken: a second listener fails with what to do.
	if _, err := telemetry.StartOps(telemetry.OpsConfig{Addr: ops.Addr()}); err == nil || !strings.Contains(err.Error(), "--metrics-addr") {
		t.Errorf("second listener on %s: err %v", ops.Addr(), err)
	}
	if err := ops.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := ops.Shutdown(context.Background()); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("listener still answers after Shutdown")
	}
	http.DefaultClient.CloseIdleConnections()
}

// TraceHandler keeps slog's handler contract (groups, attrs, zero time…).
func TestTraceHandlerConforms(t *testing.T) {
	var buf bytes.Buffer
	slogtest.Run(t, func(*testing.T) slog.Handler {
		buf.Reset()
		return telemetry.TraceHandler(slog.NewJSONHandler(&buf, nil))
	}, func(t *testing.T) map[string]any {
		var m map[string]any
		if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
			t.Fatal(err)
		}
		return m
	})
}
