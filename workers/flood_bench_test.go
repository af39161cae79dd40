package workers_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
	"github.com/authbus/authbus/workers"
)

// BenchmarkTenantFlood: tenant acme floods 20 000 auth.401 reports (each
// with a fingerprint of its own, so none is a duplicate) through the
// intake, and then, while the backlog drains, tenant bravo reports a 401
// again and again, each waiting for its rotation. It reports bravo's 401 → auth.rotated latency
// (p50, p99, max) and how long the flood took to drain, with the defaults
// (acme's excess goes to the slow lane) and with the lanes turned off (one
// FIFO, as before the intake):
//
//	go test -run '^$' -bench TenantFlood -benchtime 1x ./workers/
func BenchmarkTenantFlood(b *testing.B) {
	for _, mode := range []struct {
		name string
		tune func(*workers.Config)
	}{
		{"lanes", nil},
		{"fifo", func(c *workers.Config) { c.TenantRate, c.TenantBurst = 1e9, 1<<30 }},
	} {
		b.Run(mode.name, func(b *testing.B) {
			for b.Loop() {
				floodOnce(b, mode.tune)
			}
		})
	}
}

func floodOnce(b *testing.B, tune func(*workers.Config)) {
	const flood, probes = 20_000, 100
	f := fleet.Setup(b)
	f.StartPools(b, 2, func(c *workers.Config) {
		c.Workers = 0 // the default
		c.Logger = slog.New(slog.DiscardHandler)
		if tune != nil {
			tune(c)
		}
	})
	acme, bravo := fleet.MustKey(b, "acme.flood.github"), fleet.MustKey(b, "bravo.bob.github")
	f.Register(b, acme, f.AS.Issue(fleet.ClientID), nil)
	reg := f.Register(b, bravo, f.AS.Issue(fleet.ClientID), nil)
	w := f.Watch(b, bravo)

	// Each tenant on a connection of its own, as separate runtimes are:
	// on one connection bravo's report would wait behind acme's flood in
	// the client itself.
	acmeNC := natstest.Connect(b, f.Srv)
	bravoJS, err := jetstream.New(natstest.Connect(b, f.Srv))
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	start := time.Now()
	var wg sync.WaitGroup
	for p := range 4 {
		wg.Go(func() {
			for i := p; i < flood; i += 4 {
				data, _ := events.Encode(acme, "bench/acme", events.Unauthorized{Fingerprint: events.Fingerprint(fmt.Sprint("flood-", i)), Runtime: "acme"})
				// Fire and forget, the cheapest flood there is.
				if err := acmeNC.Publish(f.Subj.Event(events.Type401, acme), data); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	// The flood is in before bravo reports: what is measured is bravo's
	// wait behind acme's backlog, not the machine taking 20 000 messages in
	// at once (publishers, server and refreshers share this process).
	wg.Wait()
	if err := acmeNC.Flush(); err != nil {
		b.Fatal(err)
	}
	published := time.Since(start)
	var lat []time.Duration
	fp, version := reg.Fingerprint, int64(1)
	for range probes {
		t0 := time.Now()
		if _, err := bravoJS.Publish(ctx, f.Subj.Event(events.Type401, bravo), mustEncode(b, bravo, fp),
			jetstream.WithMsgID(events.MsgID(events.Type401, bravo, fp))); err != nil {
			b.Fatal(err)
		}
		version++
		ev := w.WaitFor(b, "bravo's rotation", fleet.RotatedVersion(version))
		lat = append(lat, time.Since(t0))
		fp = ev.Rotated.Fingerprint
	}
	fleet.Eventually(b, 5*time.Minute, "the flood drained", func() bool { return fleet.QueueEmpty(f.JS, f.Subj) })
	drained := time.Since(start)
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(lat[len(lat)/2]), "bravo-p50-ms")
	// Nearest rank: the smallest value at or above 99 % of the probes.
	b.ReportMetric(ms(lat[(len(lat)*99+99)/100-1]), "bravo-p99-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "bravo-max-ms")
	b.ReportMetric(published.Seconds(), "flood-in-s")
	b.ReportMetric(drained.Seconds(), "flood-drain-s")
}

func mustEncode(b *testing.B, key events.Key, fp string) []byte {
	data, err := events.Encode(key, "bench/bravo", events.Unauthorized{Fingerprint: fp, Runtime: "bravo"})
	if err != nil {
		b.Fatal(err)
	}
	return data
}
