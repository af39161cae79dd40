package main

import (
	"context"
	"strings"
	"testing"

	"github.com/authbus/authbus/internal/soak"
)

// The soak subcommand end to end, in process, small: internal/soak tests
// the accounting, cmd/refresher the refresher processes.
func TestSoakSubcommand(t *testing.T) {
	r := runCmd(t, context.Background(), "", "soak", "--credentials", "5", "--lifetime", "4s", "--duration", "3s", "--refreshers", "1", "--json").want(t, 0)
	rep := mustJSON[soak.Report](t, r.out)
	if rep.Credentials != 5 || rep.Reuses != 0 || !strings.Contains(rep.Refreshers, "1 pools in this process") {
		t.Errorf("report %+v: want 5 credentials, no reuse, one pool in process", rep)
	}
	if !strings.Contains(r.errOut, "registered in") {
		t.Errorf("no progress on stderr: %q", r.errOut)
	}
	for _, bad := range [][]string{{"--kill-at", "soon"}, {"--lifetime", "1s"}, {"extra"}} {
		r := runCmd(t, context.Background(), "", append([]string{"soak"}, bad...)...).want(t, 2)
		if r.errOut == "" {
			t.Errorf("soak %v: no error message", bad)
		}
	}
}
