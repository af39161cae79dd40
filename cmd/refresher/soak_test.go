package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/soak"
)

// publisher soak against refresher processes of this binary: one is killed
// with SIGKILL and started again, and each process's own usage is
// measured. Short: the figures come from the long runs in
// docs/performance.md.
func TestSoakAgainstRefresherProcesses(t *testing.T) {
	t.Parallel()
	bin := cmdtest.Binaries(t)
	cmd := exec.Command(filepath.Join(bin, "publisher"), "soak", "--refresher", filepath.Join(bin, "refresher"),
		"--credentials", "20", "--lifetime", "6s", "--duration", "12s", "--kill-at", "6s", "--json")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("publisher soak: %v\n%s", err, stderr)
	}
	var rep soak.Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("--json: %v\n%s", err, out)
	}
	if rep.Kills != 1 || len(rep.Usage) != 3 || rep.Usage[0].Incarnations != 2 || rep.Usage[1].Incarnations != 1 {
		t.Fatalf("kills %d, usage %+v: want the first of two refreshers killed once and started again, and the soak's own", rep.Kills, rep.Usage)
	}
	for _, u := range rep.Usage {
		if u.CPUSeconds <= 0 || u.PeakRSSMiB <= 0 {
			t.Errorf("%s: %.2f s CPU, %.1f MiB: want both measured from /proc", u.Name, u.CPUSeconds, u.PeakRSSMiB)
		}
	}
	if rep.Generations < rep.Credentials || rep.Outcomes["rotated"] == 0 || rep.Lag.N == 0 {
		t.Errorf("generations %d, outcomes %v, lag %+v: the refreshers did not refresh, or their logs were not read", rep.Generations, rep.Outcomes, rep.Lag)
	}
	if rep.LostSchedules != 0 {
		t.Errorf("lost schedules = %d, want 0", rep.LostSchedules)
	}
}
