package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/contrib/propagators/autoprop"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	promexporter "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// DefaultServiceName is the service.name of a refresher unless
// OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise.
const DefaultServiceName = "authbus-refresher"

// Config configures Setup. Zero values mean the documented defaults; the
// OTEL_* environment decides where telemetry goes.
type Config struct {
	// ServiceName is the resource's service.name; "" means
	// DefaultServiceName. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
	// override it, as the OTel specification requires.
	ServiceName string
	// ServiceVersion is the resource's service.version; "" leaves it out.
	ServiceVersion string
	// InstanceID is the resource's service.instance.id; "" means
	// hostname-pid, the same default as the refresh pool's instance name.
	InstanceID string
	// Prometheus adds a Prometheus reader to the meter provider, served by
	// Providers.MetricsHandler; metrics are then collected even when no
	// OTEL_METRICS_EXPORTER is set.
	Prometheus bool
	// KeepGlobals leaves the OTel global providers, propagator and error
	// handler alone. A process sets them (libraries such as otelhttp read
	// them); tests that run in parallel do not.
	KeepGlobals bool
	// Logger receives OTel's own errors (a failing export, say) when the
	// globals are installed; nil means slog.Default().
	Logger *slog.Logger
}

// Providers are what Setup built. The fields are safe for concurrent use.
type Providers struct {
	// TracerProvider exports spans where OTEL_TRACES_EXPORTER says; it is a
	// no-op provider when nothing is configured.
	TracerProvider trace.TracerProvider
	// MeterProvider feeds the Prometheus reader and OTEL_METRICS_EXPORTER;
	// it is a no-op provider when there is neither.
	MeterProvider metric.MeterProvider
	// Propagator is what OTEL_PROPAGATORS names; W3C Trace Context and
	// Baggage when unset.
	Propagator propagation.TextMapPropagator
	// MetricsHandler serves the Prometheus text exposition of every
	// instrument of MeterProvider, plus Go runtime and process metrics; nil
	// unless Config.Prometheus.
	MetricsHandler http.Handler
	// Tracing reports whether spans are exported anywhere.
	Tracing bool
	// MetricsExporter names the OTEL_METRICS_EXPORTER in use ("" for none).
	MetricsExporter string
}

// Setup builds tracer and meter providers from the standard OTEL_*
// environment, with a resource naming the service, its version and this
// instance, and (unless cfg.KeepGlobals) installs them as the OTel globals.
// The returned shutdown flushes and stops everything; call it last, after
// the work whose telemetry it carries has finished.
//
// OTEL_TRACES_EXPORTER and OTEL_METRICS_EXPORTER take the values of the OTel
// specification (otlp, console, none; and prometheus for metrics, which is
// served on the refresher's own metrics listener). Unlike the
// specification's default, an unset exporter variable means "otlp" only when
// an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or its per-signal variant) is
// set: a refresher started with no OTEL_* variables exports nothing, spends
// next to nothing on tracing, and does not log failed exports to a collector
// that is not there. OTEL_SDK_DISABLED=true turns everything off.
func Setup(ctx context.Context, cfg Config) (p *Providers, shutdown func(context.Context) error, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	p = &Providers{
		TracerProvider: tracenoop.NewTracerProvider(),
		MeterProvider:  metricnoop.NewMeterProvider(),
		Propagator:     autoprop.NewTextMapPropagator(),
	}
	var shutdowns []func(context.Context) error
	stopAll := func(ctx context.Context) error {
		var errs []error
		for i := len(shutdowns) - 1; i >= 0; i-- {
			errs = append(errs, shutdowns[i](ctx))
		}
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("telemetry shutdown: %w", err)
		}
		return nil
	}
	defer func() {
		if err != nil {
			_ = stopAll(ctx)
		}
	}()

	disabled, _ := strconv.ParseBool(os.Getenv("OTEL_SDK_DISABLED"))
	if !disabled {
		res, err := newResource(ctx, cfg)
		if err != nil {
			return nil, nil, err
		}
		spans, err := spanExporter(ctx)
		if err != nil {
			return nil, nil, err
		}
		if spans != nil {
			tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(spans), sdktrace.WithResource(res))
			shutdowns = append(shutdowns, tp.Shutdown)
			p.TracerProvider, p.Tracing = tp, true
		}
		readers, handler, name, err := metricReaders(ctx, cfg.Prometheus)
		if err != nil {
			return nil, nil, err
		}
		if len(readers) > 0 {
			opts := []sdkmetric.Option{sdkmetric.WithResource(res)}
			for _, r := range readers {
				opts = append(opts, sdkmetric.WithReader(r))
			}
			mp := sdkmetric.NewMeterProvider(opts...)
			shutdowns = append(shutdowns, mp.Shutdown)
			p.MeterProvider, p.MetricsHandler, p.MetricsExporter = mp, handler, name
		}
	}
	if cfg.Prometheus && p.MetricsHandler == nil {
		// Disabled SDK: /metrics still answers, empty, rather than 404.
		p.MetricsHandler = promhttp.HandlerFor(prometheus.NewRegistry(), promhttp.HandlerOpts{})
	}
	if !cfg.KeepGlobals {
		otel.SetTracerProvider(p.TracerProvider)
		otel.SetMeterProvider(p.MeterProvider)
		otel.SetTextMapPropagator(p.Propagator)
		log := cfg.Logger
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
			log.Warn("OpenTelemetry error; check the OTEL_* settings and the collector", "error", err)
		}))
	}
	return p, stopAll, nil
}

// newResource is the service's identity in every span and metric; the
// environment overrides the defaults.
func newResource(ctx context.Context, cfg Config) (*resource.Resource, error) {
	name := cfg.ServiceName
	if name == "" {
		name = DefaultServiceName
	}
	instance := cfg.InstanceID
	if instance == "" {
		host, _ := os.Hostname()
		instance = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	attrs := []attribute.KeyValue{semconv.ServiceName(name), semconv.ServiceInstanceID(instance)}
	if cfg.ServiceVersion != "" {
		attrs = append(attrs, semconv.ServiceVersion(cfg.ServiceVersion))
	}
	res, err := resource.New(ctx,
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithTelemetrySDK(),
		resource.WithAttributes(attrs...),
		resource.WithFromEnv(), // last: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil {
		return nil, fmt.Errorf("telemetry resource: %w; check OTEL_RESOURCE_ATTRIBUTES (key=value pairs separated by commas)", err)
	}
	return res, nil
}

// otlpEndpointSet reports whether an OTLP endpoint is configured for signal
// ("TRACES" or "METRICS"): the one sign that someone runs a collector.
func otlpEndpointSet(signal string) bool {
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_"+signal+"_ENDPOINT") != ""
}

// none is the fallback factory result meaning "export nothing".
func none[T any](context.Context) (T, error) {
	var zero T
	return zero, nil
}

// spanExporter is the exporter OTEL_TRACES_EXPORTER names, or nil when
// spans go nowhere.
func spanExporter(ctx context.Context) (sdktrace.SpanExporter, error) {
	var opts []autoexport.SpanOption
	if !otlpEndpointSet("TRACES") {
		// autoexport falls back to OTLP on localhost when the variable is
		// unset; with no endpoint either, nobody asked for traces.
		opts = append(opts, autoexport.WithFallbackSpanExporter(none[sdktrace.SpanExporter]))
	}
	exp, err := autoexport.NewSpanExporter(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("trace exporter from OTEL_TRACES_EXPORTER=%q: %w; use otlp, console or none", os.Getenv("OTEL_TRACES_EXPORTER"), err)
	}
	if exp == nil || autoexport.IsNoneSpanExporter(exp) {
		return nil, nil
	}
	return exp, nil
}

// metricReaders are the Prometheus reader (when asked for) and the reader
// OTEL_METRICS_EXPORTER names, if any.
func metricReaders(ctx context.Context, withPrometheus bool) (readers []sdkmetric.Reader, handler http.Handler, name string, err error) {
	if withPrometheus {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		exp, err := promexporter.New(promexporter.WithRegisterer(reg))
		if err != nil {
			return nil, nil, "", fmt.Errorf("prometheus exporter: %w", err)
		}
		readers = append(readers, exp)
		handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	}
	name = strings.TrimSpace(os.Getenv("OTEL_METRICS_EXPORTER"))
	if name == "prometheus" && withPrometheus {
		// Served on our own listener; autoexport would open a second one
		// on the same default port.
		return readers, handler, name, nil
	}
	var opts []autoexport.MetricOption
	if !otlpEndpointSet("METRICS") {
		opts = append(opts, autoexport.WithFallbackMetricReader(none[sdkmetric.Reader]))
	}
	r, err := autoexport.NewMetricReader(ctx, opts...)
	if err != nil {
		return nil, nil, "", fmt.Errorf("metric reader from OTEL_METRICS_EXPORTER=%q: %w; use otlp, prometheus, console or none", name, err)
	}
	if r == nil || autoexport.IsNoneMetricReader(r) {
		return readers, handler, "", nil
	}
	if name == "" {
		name = "otlp"
	}
	return append(readers, r), handler, name, nil
}
