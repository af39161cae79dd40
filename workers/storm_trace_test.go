package workers_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/telemetry"
	"github.com/authbus/authbus/workers"
)

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
	// Acks are fire-and-forget publishes: once the pool's connection has
	// flushed them the server has them, and applies them in a moment
	// (well within the 3s ack wait after which it would redeliver).
	if err := o.Pools[0].NC.Flush(); err != nil {
		t.Fatal(err)
	}
	cons, err := o.JS.Consumer(context.Background(), o.Subj.EventsStream(), "refreshers")
	if err != nil {
		t.Fatal(err)
	}
	var ci *jetstream.ConsumerInfo
	fleet.Eventually(t, 2*time.Second, "the consumer counts every event settled", func() bool {
		ci, err = cons.Info(context.Background())
		return err == nil && ci.NumPending == 0 && ci.NumAckPending == 0
	})
	if ci.NumRedelivered != 0 {
		t.Errorf("after the stop: %d redelivered, want 0", ci.NumRedelivered)
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
				// Without Nats-Msg-Id straight into the work queue, so
				// that every publish reaches a pool.
				msg := nats.NewMsg(bd.Subj.Work(events.Type401, keys[i]))
				msg.Data = datas[i]
				msg.Header = telemetry.Inject(ctx, msg.Header)
				var opts []jetstream.PublishOpt
				if msgID {
					msg.Subject = bd.Subj.Event(events.Type401, keys[i])
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
