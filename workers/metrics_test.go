package workers_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers"
)

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
				// Straight into the work queue: the intake refuses it at
				// the door (TestMalformedEventsAreTerminated).
				if _, err := e.o.JS.Publish(context.Background(), e.o.Subj.Work(events.Type401, e.key), []byte("not json")); err != nil {
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
			// Endpoints are labelled by scheme and host.
			calls := histCount(rm, "authbus.token_endpoint.duration", attribute.String("endpoint", o.AS.BaseURL()))
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
				if v, ok := gauge(rm, "authbus.breaker.state", attribute.String("endpoint", o.AS.BaseURL()), attribute.String("scope", "client")); !ok || v != 2 {
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
	// A pool that is created but not running: events stay pending. With
	// no intake running, they are written straight into the work queue.
	if _, err := workers.New(context.Background(), nc, cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		o.Publish401(t, key, events.Fingerprint(fmt.Sprint("token-", i)), "rt", false)
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
	o.Publish401(t, key, events.Fingerprint("token-3"), "rt", false)
	serverCounts(4)
	if v, _ := gauge(collect(t, o.reader), "authbus.consumer.pending"); v != 3 {
		t.Errorf("pending = %d right after the previous collection, want the cached 3", v)
	}
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
	if _, err := b.JS.Publish(context.Background(), b.Subj.Event(events.Type401, key), []byte("not json")); err == nil {
		t.Fatal("the intake took a report that is not JSON")
	}
	if _, err := b.JS.Publish(context.Background(), b.Subj.Work(events.Type401, key), []byte("not json")); err != nil {
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
		`authbus_token_endpoint_duration_seconds_count{endpoint="` + b.AS.BaseURL() + `"`,
		`authbus_breaker_state{endpoint="` + b.AS.BaseURL() + `"`,
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
