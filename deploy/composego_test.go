package deploy

import (
	"context"
	"maps"
	"path/filepath"
	"slices"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
)

// TestComposeConfig loads compose.yaml with compose-go, the loader behind
// `docker compose config`: the compose-spec JSON schema, interpolation in an
// empty environment, and the consistency checks (every service, network,
// volume and secret a service names exists; no dependency cycle). It runs
// for the default deployment and with every profile enabled, and the
// services compose would start must be the ones the other tests check.
func TestComposeConfig(t *testing.T) {
	for _, tc := range []struct {
		name     string
		profiles []string
	}{
		{"default", nil},
		{"all profiles", []string{"*"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, err := cli.NewProjectOptions([]string{filepath.Join(repoRoot, "compose.yaml")},
				cli.WithWorkingDirectory(repoRoot), cli.WithProfiles(tc.profiles), cli.WithConsistency(true))
			if err != nil {
				t.Fatal(err)
			}
			p, err := opts.LoadProject(context.Background())
			if err != nil {
				t.Fatalf("docker compose config would refuse compose.yaml: %v", err)
			}
			if p.Name != "authbus" {
				t.Errorf("project name %q, want authbus", p.Name)
			}
			var want []string
			for name, s := range loadCompose(t).Services {
				if len(s.Profiles) == 0 || tc.profiles != nil {
					want = append(want, name)
				}
			}
			slices.Sort(want)
			if got := slices.Sorted(maps.Keys(p.Services)); !slices.Equal(got, want) {
				t.Errorf("compose-go services %v, want %v", got, want)
			}
			for name, s := range p.Services {
				if s.HealthCheck == nil || (s.HealthCheck.Test == nil && !s.HealthCheck.Disable) {
					t.Errorf("service %s: compose-go sees no healthcheck", name)
				}
			}
		})
	}
}
