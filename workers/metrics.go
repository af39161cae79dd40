package workers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// instrumentationName is the tracer and meter name of the pool.
const instrumentationName = "github.com/authbus/authbus/workers"

// Attribute keys of authbus's own span and metric attributes. Values are
// credential keys, fingerprints, outcome names and endpoint URLs without
// query or user info: never a token or secret.
const (
	attrKey           = attribute.Key("authbus.credential.key")
	attrFingerprint   = attribute.Key("authbus.fingerprint")
	attrOutcome       = attribute.Key("authbus.outcome")
	attrAttempt       = attribute.Key("authbus.attempt")
	attrLeaseWait     = attribute.Key("authbus.lease.wait")
	attrVersion       = attribute.Key("authbus.credential.version")
	attrState         = attribute.Key("authbus.credential.state")
	attrLeaseHeld     = attribute.Key("authbus.lease.held")
	attrLeaseRevision = attribute.Key("authbus.lease.revision")
	attrConflict      = attribute.Key("authbus.store.conflict")
	attrScheduleAt    = attribute.Key("authbus.schedule.at")
)

// consumerInfoTTL is how long the consumer's pending counts are reused: each
// refresh of them is a JetStream API request, and a storm of scrapes must
// not become a storm of requests.
const consumerInfoTTL = 5 * time.Second

// histogramBounds (seconds) cover a fast token endpoint (a few ms) up to the
// 30s default token timeout; OTel's default buckets are made for
// milliseconds.
var histogramBounds = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// metrics are the pool's instruments. Their names are the contract with the
// Grafana dashboard in deploy/grafana (the Prometheus exporter turns
// "authbus.events.processed" into authbus_events_processed_total, and
// seconds histograms get a _seconds suffix).
type metrics struct {
	endpoints  *endpointLabels         // the endpoint label of both series below
	processed  metric.Int64Counter     // authbus.events.processed{outcome}
	duration   metric.Float64Histogram // authbus.event.duration{outcome}
	tokenCall  metric.Float64Histogram // authbus.token_endpoint.duration{endpoint,result}
	contention metric.Int64Counter     // authbus.lease.contention
	terminated metric.Int64Counter     // authbus.events.terminated{reason}
}

// newMetrics creates the pool's instruments on mp, and the observable gauges
// of its breakers and consumer. The callbacks live as long as mp.
func newMetrics(mp metric.MeterProvider, p *Pool) (*metrics, error) {
	m := mp.Meter(instrumentationName, metric.WithInstrumentationVersion(Version))
	var errs [8]error
	ms := &metrics{endpoints: &endpointLabels{max: maxEndpointLabels}}
	ms.processed, errs[0] = m.Int64Counter("authbus.events.processed", metric.WithUnit("{event}"),
		metric.WithDescription("auth.401 and auth.expiring deliveries processed, by outcome (rotated counts token rotations)"))
	ms.duration, errs[1] = m.Float64Histogram("authbus.event.duration", metric.WithUnit("s"),
		metric.WithDescription("time to process one delivered event, by outcome"),
		metric.WithExplicitBucketBoundaries(histogramBounds...))
	ms.tokenCall, errs[2] = m.Float64Histogram("authbus.token_endpoint.duration", metric.WithUnit("s"),
		metric.WithDescription("token-endpoint call latency, by endpoint and result (success, permanent, transient, canceled)"),
		metric.WithExplicitBucketBoundaries(histogramBounds...))
	ms.contention, errs[3] = m.Int64Counter("authbus.lease.contention", metric.WithUnit("{event}"),
		metric.WithDescription("events that found their credential's refresh lease held by another worker and were redelivered later"))
	ms.terminated, errs[4] = m.Int64Counter("authbus.events.terminated", metric.WithUnit("{event}"),
		metric.WithDescription("events terminated without redelivery, by reason (bad_input, unknown_credential, max_deliver)"))
	breaker, err5 := m.Int64ObservableGauge("authbus.breaker.state",
		metric.WithDescription("token-endpoint circuit breakers in this process, the worst state per endpoint (scheme and host) and scope (endpoint, tenant, client): 0 closed, 1 half-open, 2 open"))
	pending, err6 := m.Int64ObservableGauge("authbus.consumer.pending", metric.WithUnit("{event}"),
		metric.WithDescription("events in the work queue not yet delivered to any refresher"))
	ackPending, err7 := m.Int64ObservableGauge("authbus.consumer.ack_pending", metric.WithUnit("{event}"),
		metric.WithDescription("events delivered to refreshers and not yet settled"))
	errs[5], errs[6], errs[7] = err5, err6, err7
	if err := errors.Join(errs[:]...); err != nil {
		return nil, fmt.Errorf("pool metrics: %w", err)
	}
	info := &infoCache{cons: p.cons, ttl: consumerInfoTTL}
	if _, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		worst := map[[2]string]gobreaker.State{}
		for k, state := range p.breakers.states() {
			series := [2]string{ms.endpoints.label(k.endpoint), k.scope.String()}
			worst[series] = max(worst[series], state)
		}
		for series, state := range worst {
			o.ObserveInt64(breaker, int64(state), metric.WithAttributes(
				attribute.String("endpoint", series[0]), attribute.String("scope", series[1])))
		}
		if ci := info.get(ctx); ci != nil {
			o.ObserveInt64(pending, int64(ci.NumPending))
			o.ObserveInt64(ackPending, int64(ci.NumAckPending))
		}
		return nil
	}, breaker, pending, ackPending); err != nil {
		return nil, fmt.Errorf("pool metrics callback: %w", err)
	}
	return ms, nil
}

// processAttrs are the OTel messaging attributes of a span that processes a
// message of size bytes received on subject.
func processAttrs(subject string, size int, more ...attribute.KeyValue) []attribute.KeyValue {
	return append([]attribute.KeyValue{
		semconv.MessagingSystemKey.String("nats"),
		semconv.MessagingOperationTypeProcess,
		semconv.MessagingOperationName("process"),
		semconv.MessagingDestinationName(subject),
		semconv.MessagingMessageBodySize(size),
	}, more...)
}

// settled records one processed event.
func (m *metrics) settled(ctx context.Context, r result, gaveUp bool, took time.Duration) {
	outcome := metric.WithAttributeSet(attribute.NewSet(attribute.String("outcome", r.outcome.String())))
	m.processed.Add(ctx, 1, outcome)
	m.duration.Record(ctx, took.Seconds(), outcome)
	if r.action == actionTerm {
		reason := r.outcome.String()
		if gaveUp {
			reason = "max_deliver"
		}
		m.terminated.Add(ctx, 1, metric.WithAttributes(attribute.String("reason", reason)))
	}
}

// tokenCalled records one token-endpoint call; a call the open breaker
// refused never reached the server and is not recorded.
func (m *metrics) tokenCalled(ctx context.Context, endpoint string, took time.Duration, err error) {
	var res string
	switch classify(err).verdict {
	case rotated:
		res = "success"
	case permanent:
		res = "permanent"
	case transient:
		res = "transient"
	case canceled:
		res = "canceled"
	default:
		return
	}
	m.tokenCall.Record(ctx, took.Seconds(), metric.WithAttributes(
		attribute.String("endpoint", m.endpoints.label(endpoint)), attribute.String("result", res)))
}

// maxEndpointLabels bounds the endpoint label values of this process's
// series: a tenant that registers thousands of distinct endpoints must not
// make thousands of series.
const maxEndpointLabels = 64

// otherEndpoints is the label of the endpoints beyond maxEndpointLabels.
const otherEndpoints = "other"

// endpointLabels names token endpoints in metrics: by scheme and host
// only (paths and queries are a tenant's to vary, and could carry
// credentials), the first maxEndpointLabels hosts seen by name and every
// later one as "other". A label once given stays: a series cannot be
// taken back from an exporter. Safe for concurrent use.
type endpointLabels struct {
	max  int
	mu   sync.Mutex
	seen map[string]bool
}

func (l *endpointLabels) label(endpoint string) string {
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return otherEndpoints
	}
	name := u.Scheme + "://" + strings.ToLower(u.Host)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen[name] {
		return name
	}
	if len(l.seen) >= l.max {
		return otherEndpoints
	}
	if l.seen == nil {
		l.seen = map[string]bool{}
	}
	l.seen[name] = true
	return name
}

// redactURL is a URL as logs show it: without user info, query or
// fragment, which could carry credentials.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "unparsable"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

// infoCache reuses the consumer's info for ttl. Safe for
// concurrent use; concurrent callers wait for one request.
type infoCache struct {
	cons jetstream.Consumer
	ttl  time.Duration

	mu   sync.Mutex
	at   time.Time
	info *jetstream.ConsumerInfo // nil after a failed request
}

// get returns the consumer info, or nil when it could not be had: a gauge
// that is not observed is better than a made-up zero.
func (c *infoCache) get(ctx context.Context) *jetstream.ConsumerInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < c.ttl {
		return c.info
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := c.cons.Info(ctx)
	if err != nil {
		info = nil // also cached: a failing server is not asked on every scrape
	}
	c.info, c.at = info, time.Now()
	return c.info
}

// instrumentHTTP returns a copy of hc whose transport makes an HTTP client
// span (a child of the refresh's span: x/oauth2 sends with the context it
// is given) and HTTP client metrics for every token-endpoint call. The
// span carries method, URL without user info, server address and status,
// never the form body or the Authorization header.
func instrumentHTTP(hc *http.Client, tp trace.TracerProvider, mp metric.MeterProvider) *http.Client {
	c := *hc
	c.Transport = otelhttp.NewTransport(transportOf(hc),
		otelhttp.WithTracerProvider(tp),
		otelhttp.WithMeterProvider(mp),
		// HTTP semantic conventions name client spans by the method alone
		// when there is no low-cardinality route.
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string { return r.Method }),
	)
	return &c
}

// Ready reports whether the pool can do its work, for a readiness probe:
// the NATS connection is up and the events, schedules and needs_reauth
// streams and the credentials, leases and failures buckets exist. Each
// call makes six JetStream API requests; errors say what is missing and
// never hold a secret.
func (p *Pool) Ready(ctx context.Context) error {
	if st := p.nc.Status(); st != nats.CONNECTED {
		return fmt.Errorf("NATS connection is %s; check the NATS server and --nats-url", st)
	}
	for _, s := range []string{p.subj.EventsStream(), p.subj.SchedulesStream(), p.subj.ReauthStream()} {
		if _, err := p.js.Stream(ctx, s); err != nil {
			return fmt.Errorf("stream %s: %w; restart the refresher to create it, or check JetStream", s, err)
		}
	}
	for _, b := range []string{p.subj.CredentialsBucket(), p.subj.LeasesBucket(), p.subj.FailuresBucket()} {
		if _, err := p.js.KeyValue(ctx, b); err != nil {
			return fmt.Errorf("KV bucket %s: %w; restart the refresher to create it, or check JetStream", b, err)
		}
	}
	return nil
}
