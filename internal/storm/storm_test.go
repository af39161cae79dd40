package storm_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/storm"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// small is a storm small enough to run in a few seconds, with counts that
// are known in advance.
func small() storm.Config {
	return storm.Config{
		Credentials: 12, Runtimes: 4, Waves: 2, Processes: 2,
		Pools: 2, Workers: 4, Publishers: 4, Probes: 3,
		WaveTimeout: 30 * time.Second,
	}
}

// want is the known answer of a mode for a storm of k credentials, n
// runtimes, p processes and w waves against a rotating server without a
// reuse grace: every runtime (naive) or process (inprocess) redeems the same
// refresh token, so all calls of a generation but the first are reuses, and
// each gets invalid_grant; authbus and the ceiling call once.
func want(m storm.Mode, cfg storm.Config) (perGen, calls, reuses int) {
	switch m {
	case storm.ModeNaive:
		perGen = cfg.Runtimes
	case storm.ModeInProcess:
		perGen = cfg.Processes
	default:
		perGen = 1
	}
	gens := cfg.Credentials * cfg.Waves
	return perGen, perGen * gens, (perGen - 1) * gens
}

func TestStormAccounting(t *testing.T) {
	cfg := small()
	var progress strings.Builder
	cfg.Progress = &progress
	rep, err := storm.Run(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if len(rep.Modes) != len(storm.AllModes) {
		t.Fatalf("got %d mode results, want %d", len(rep.Modes), len(storm.AllModes))
	}
	gens := cfg.Credentials * cfg.Waves
	for _, m := range storm.AllModes {
		t.Run(string(m), func(t *testing.T) {
			r := rep.Mode(m)
			perGen, calls, reuses := want(m, cfg)
			if r.Calls != calls {
				t.Errorf("token calls = %d, want %d", r.Calls, calls)
			}
			if g := r.CallsPerGeneration; !r.PerGenerationExact || g.Min != perGen || g.Max != perGen || g.Mean != float64(perGen) {
				t.Errorf("calls per generation = %+v (exact %v), want %d/%d/%d", g, r.PerGenerationExact, perGen, perGen, perGen)
			}
			if r.Reuses != reuses {
				t.Errorf("reuses = %d, want %d", r.Reuses, reuses)
			}
			// Every reuse is answered invalid_grant: whoever sent it must
			// send a person back to log in.
			if r.NeedsReauth != reuses {
				t.Errorf("needs_reauth = %d, want %d", r.NeedsReauth, reuses)
			}
			if r.Unrefreshed != 0 || r.Failed != 0 {
				t.Errorf("unrefreshed %d, failed %d; want 0 and 0", r.Unrefreshed, r.Failed)
			}
			if r.Latency.N != gens {
				t.Errorf("latency samples = %d, want one per generation, %d", r.Latency.N, gens)
			}
			if r.Events != gens*cfg.Runtimes {
				t.Errorf("events = %d, want %d", r.Events, gens*cfg.Runtimes)
			}
			if r.PeakCallsPerSec < 1 || r.PeakCallsPerSec > calls {
				t.Errorf("peak calls/s = %d, want 1..%d", r.PeakCallsPerSec, calls)
			}
			switch m {
			case storm.ModeAuthbus, storm.ModeCeiling:
				// The pools run in this process: each probe's call is
				// timed, so the added latency is known.
				if r.Probe == nil || r.Probe.N != cfg.Probes || r.ProbeAdded == nil || r.ProbeAdded.N != cfg.Probes {
					t.Errorf("probes = %+v, added %+v; want %d of each", r.Probe, r.ProbeAdded, cfg.Probes)
				}
			default:
				if r.Probe != nil {
					t.Errorf("probe without NATS: %+v", r.Probe)
				}
			}
		})
	}
	if a := rep.Mode(storm.ModeAuthbus); a.OfCeiling <= 0 {
		t.Errorf("authbus %% of ceiling = %v, want it computed", a.OfCeiling)
	}
	if !strings.Contains(progress.String(), "authbus: done") {
		t.Errorf("progress did not report the authbus mode:\n%s", progress.String())
	}
	var table strings.Builder
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"naive", "inprocess", "authbus", "ceiling", "refresh-token reuses", "% of ceiling"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
}

// With an external deployment the storm only publishes and watches: the
// deployment's refreshers call the token endpoint, and the counts are the
// same.
func TestStormExternalDeployment(t *testing.T) {
	f := fleet.Setup(t)
	f.StartPools(t, 2, nil)
	cfg := small()
	cfg.Modes = []storm.Mode{storm.ModeAuthbus}
	cfg.NATSURL = f.Srv.ClientURL()
	rep, err := storm.Run(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	r := rep.Mode(storm.ModeAuthbus)
	_, calls, _ := want(storm.ModeAuthbus, cfg)
	if r.Calls != calls || r.CallsPerGeneration.Max != 1 || r.Reuses != 0 || r.NeedsReauth != 0 {
		t.Errorf("calls %d (max %d per generation), reuses %d, needs_reauth %d; want %d, 1, 0, 0",
			r.Calls, r.CallsPerGeneration.Max, r.Reuses, r.NeedsReauth, calls)
	}
	if r.Probe == nil || r.Probe.N != cfg.Probes || r.ProbeAdded != nil {
		t.Errorf("probe %+v, added %+v; want %d probes and no added latency (the calls are made elsewhere)", r.Probe, r.ProbeAdded, cfg.Probes)
	}
	// The run's credentials are gone from the deployment afterwards.
	keys, err := f.Store.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 0 {
		t.Errorf("%d credentials left behind in the deployment, e.g. %s", len(keys), keys[0])
	}
}
