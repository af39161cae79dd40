package main

import (
	"context"
	"strings"
	"testing"

	"github.com/authbus/authbus/internal/storm"
)

// The storm subcommand end to end, in process, small: the table and --json
// carry the accounting internal/storm tests in depth.
func TestStormSubcommand(t *testing.T) {
	args := []string{"storm", "--mode", "naive,authbus", "--credentials", "6", "--runtimes", "3",
		"--waves", "2", "--probes", "2", "--pools", "1"}
	r := runCmd(t, context.Background(), "", append(args, "--json")...).want(t, 0)
	rep := mustJSON[storm.Report](t, r.out)
	byMode := map[storm.Mode]*storm.ModeResult{}
	for _, m := range rep.Modes {
		byMode[m.Mode] = m
	}
	ab, naive := byMode["authbus"], byMode["naive"]
	if ab == nil || naive == nil {
		t.Fatalf("--json modes %v, want authbus and naive", rep.Modes)
	}
	if ab.Calls != 6*2 || ab.Reuses != 0 || ab.CallsPerGeneration.Max != 1 {
		t.Errorf("authbus: %d calls (want 12), %d reuses, max %d per generation", ab.Calls, ab.Reuses, ab.CallsPerGeneration.Max)
	}
	if naive.Calls != 6*2*3 || naive.Reuses == 0 {
		t.Errorf("naive: %d calls (want 36), %d reuses (want > 0)", naive.Calls, naive.Reuses)
	}
	if !strings.Contains(r.errOut, "authbus: done in") {
		t.Errorf("no progress on stderr: %q", r.errOut)
	}

	r = runCmd(t, context.Background(), "", args...).want(t, 0)
	for _, row := range []string{"token-endpoint calls", "refresh-token reuses", "% of ceiling"} {
		if !strings.Contains(r.out, row) {
			t.Errorf("table has no %q row:\n%s", row, r.out)
		}
	}
	runCmd(t, context.Background(), "", "storm", "--mode", "bogus").want(t, 2)
}
