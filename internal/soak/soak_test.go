package soak

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Idle keep-alive connections of the HTTP transports end with their
		// servers; the runtime may not have reaped them yet.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// A short steady soak in process, with a restart: the accounting that the
// figures in docs/performance.md rest on. Nothing here is timed: expired
// tokens and 401s depend on the machine's load and are only reported.
func TestSoakCountsASteadyFleet(t *testing.T) {
	t.Parallel()
	var progress bytes.Buffer
	rep, err := Run(t.Context(), Config{
		Credentials:   30,
		Lifetime:      8 * time.Second,
		Duration:      14 * time.Second,
		KillAt:        []time.Duration{7 * time.Second},
		Progress:      &progress,
		ProgressEvery: 2 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", table.String())
	// Every credential was registered with at most 8 s left and the lead
	// is half of that: 14 s hold at least one generation of each.
	if rep.Generations < rep.Credentials {
		t.Errorf("generations = %d, want at least one per credential (%d)", rep.Generations, rep.Credentials)
	}
	if rep.Reuses != 0 || rep.NeedsReauth != 0 {
		t.Errorf("reuses %d, needs_reauth %d, want none", rep.Reuses, rep.NeedsReauth)
	}
	if rep.CallsPerGeneration.Min != 1 {
		t.Errorf("calls per generation %+v: some generation got no call of its own", rep.CallsPerGeneration)
	}
	if rep.LostSchedules != 0 {
		t.Errorf("lost schedules = %d, want 0", rep.LostSchedules)
	}
	if rep.Kills != 1 || len(rep.Usage) != 1 || rep.Usage[0].CPUSeconds <= 0 || rep.Usage[0].PeakRSSMiB <= 0 {
		t.Errorf("kills %d, usage %+v: want one kill and this process's usage", rep.Kills, rep.Usage)
	}
	if len(rep.Phases) != 1 || rep.Phases[0].Uses == 0 {
		t.Errorf("phases %+v: want one phase with uses", rep.Phases)
	}
	if rep.Lag.N == 0 || rep.Margin.N == 0 {
		t.Errorf("lag %+v, margin %+v: want both measured", rep.Lag, rep.Margin)
	}
	if rep.Outcomes["rotated"] == 0 {
		t.Errorf("outcomes %v: the refreshers' logs were not read", rep.Outcomes)
	}
	for _, want := range []string{"killed; starting it again", "registered in"} {
		if !strings.Contains(progress.String(), want) {
			t.Errorf("progress has no %q:\n%s", want, progress.String())
		}
	}
	for _, row := range []string{"calls per generation", "refresh-token reuses", "lost schedules at the end", "schedule lag p50/p99/max"} {
		if !strings.Contains(table.String(), row) {
			t.Errorf("table has no %q row", row)
		}
	}
}

// During an outage the token endpoint answers nothing: the runtimes' uses
// are split by phase, and the calls that arrived while it was down are
// counted as such.
func TestSoakSplitsTheOutage(t *testing.T) {
	t.Parallel()
	rep, err := Run(t.Context(), Config{
		Credentials: 30,
		Lifetime:    4 * time.Second,
		Duration:    9 * time.Second,
		OutageAt:    2 * time.Second,
		OutageFor:   4 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Phases) != 3 {
		t.Fatalf("phases %+v, want before, during and after", rep.Phases)
	}
	for _, p := range rep.Phases {
		if p.Uses == 0 {
			t.Errorf("phase %q has no uses", p.Phase)
		}
	}
	if rep.OutageCalls == 0 || rep.FailedCalls < rep.OutageCalls {
		t.Errorf("%d calls during the outage, %d failed: want the outage's calls counted as failed", rep.OutageCalls, rep.FailedCalls)
	}
	// 30 credentials due in a 4 s outage fail more than 5 times in a row:
	// the refreshers' logs must show their breakers opening.
	if rep.BreakerOpens == 0 {
		t.Errorf("%d calls during the outage and no breaker opening counted: the refreshers' breaker log lines were not read", rep.OutageCalls)
	}
	if rep.Reuses != 0 || rep.NeedsReauth != 0 {
		t.Errorf("reuses %d, needs_reauth %d, want none", rep.Reuses, rep.NeedsReauth)
	}
}

func TestSoakConfigErrors(t *testing.T) {
	t.Parallel()
	_, err := Run(context.Background(), Config{Lifetime: 1500 * time.Millisecond, Duration: time.Minute, OutageAt: 50 * time.Second,
		OutageFor: 20 * time.Second, KillAt: []time.Duration{2 * time.Minute}, Refresher: "/nonexistent/refresher"})
	if !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("err = %v, want ErrInvalidConfig", err)
	}
	for _, want := range []string{"--lifetime", "--outage-at", "--kill-at", "go build -o /tmp/refresher ./cmd/refresher"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q: %v", want, err)
		}
	}
}
