package deploy

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The Dockerfile's stages and build, as far as CI can check without a
// container engine.

var fromLine = regexp.MustCompile(`(?m)^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?`)

func dockerfile(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

func dockerfileStages(t *testing.T) []string {
	var stages []string
	for _, m := range fromLine.FindAllStringSubmatch(dockerfile(t), -1) {
		stages = append(stages, m[2])
	}
	return stages
}

// TestDockerfile checks the image recipe: a Go builder of the go.mod
// version, static binaries, distroless final stages run as non-root, the
// refresher as the default target.
func TestDockerfile(t *testing.T) {
	df := dockerfile(t)
	froms := fromLine.FindAllStringSubmatch(df, -1)
	if len(froms) < 3 {
		t.Fatalf("Dockerfile has %d stages, want build, publisher, refresher", len(froms))
	}
	goVersion := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)`).FindStringSubmatch(df)
	mod, _ := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	goDirective := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if goVersion == nil || goDirective == nil || goVersion[1] != string(goDirective[1]) {
		t.Errorf("Dockerfile GO_VERSION %v does not match go.mod's go directive %s", goVersion, goDirective)
	}
	if froms[0][1] != "golang:${GO_VERSION}-bookworm" || froms[0][2] != "build" {
		t.Errorf("first stage %q, want the golang:${GO_VERSION} build stage", froms[0][0])
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/refresher ./cmd/publisher ./deploy/probe"} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile does not contain %q", want)
		}
	}
	// Each final stage: distroless static, non-root, an entrypoint.
	finals := strings.Split(df, "\nFROM ")[2:]
	for _, st := range finals {
		name := strings.Fields(st)[2]
		if !strings.HasPrefix(st, "gcr.io/distroless/static-debian12:nonroot AS ") {
			t.Errorf("stage %s: base %q, want gcr.io/distroless/static-debian12:nonroot", name, strings.Fields(st)[0])
		}
		if !strings.Contains(st, "\nUSER 65532:65532\n") || !strings.Contains(st, `ENTRYPOINT ["/usr/local/bin/`+name+`"]`) {
			t.Errorf("stage %s: want USER 65532:65532 and ENTRYPOINT /usr/local/bin/%s", name, name)
		}
		if !strings.Contains(st, "/out/probe") {
			t.Errorf("stage %s lacks the probe its compose health check runs", name)
		}
	}
	if last := froms[len(froms)-1][2]; last != "refresher" {
		t.Errorf("last stage %q: `docker build .` should build the refresher", last)
	}

	// With CGO_ENABLED=0 the Go linker makes static binaries that run without
	// libc; that works only if no package the commands import needs cgo.
	cmd := exec.Command("go", "list", "-deps", "-e", "-f", `{{if .Error}}{{.ImportPath}}: {{.Error}}{{end}}`,
		"github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("the commands do not build with CGO_ENABLED=0: %v\n%s", err, out)
	}
}

// TestDockerignore checks that the build context keeps every file the
// image's go build needs.
func TestDockerignore(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	var patterns []string
	for _, l := range strings.Split(string(raw), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			if strings.HasPrefix(l, "!") {
				t.Fatalf(".dockerignore: exceptions (%s) are beyond this test; keep the file to plain patterns", l)
			}
			patterns = append(patterns, strings.TrimPrefix(l, "/"))
		}
	}
	out, err := exec.Command("go", "list", "-deps", "-f", `{{if not .Standard}}{{.Dir}}{{range .GoFiles}} {{.}}{{end}}{{range .EmbedFiles}} {{.}}{{end}}{{end}}`,
		"github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	abs, _ := filepath.Abs(repoRoot)
	needed := []string{"go.mod", "go.sum"}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		rel, err := filepath.Rel(abs, f[0])
		if err != nil || strings.HasPrefix(rel, "..") {
			continue // a module dependency, downloaded in the image
		}
		for _, name := range f[1:] {
			needed = append(needed, filepath.ToSlash(filepath.Join(rel, name)))
		}
	}
	for _, file := range needed {
		for _, p := range patterns {
			if dockerignoreMatch(p, file) {
				t.Errorf("%s, which the image's build needs, is excluded by .dockerignore pattern %q", file, p)
			}
		}
	}
	// And the check itself sees exclusions.
	if !dockerignoreMatch("**/*_test.go", "kv/store_test.go") || !dockerignoreMatch("docs", "docs/operations.md") || dockerignoreMatch("docs", "kv/docs.go") {
		t.Error("dockerignoreMatch is broken")
	}
}

// dockerignoreMatch reports whether pattern excludes file (slash-separated,
// relative to the context): a pattern matches the file or a parent folder,
// and **/ matches any number of folders.
func dockerignoreMatch(pattern, file string) bool {
	parts := strings.Split(file, "/")
	for i := 1; i <= len(parts); i++ {
		prefix := strings.Join(parts[:i], "/")
		if ok, _ := path.Match(pattern, prefix); ok {
			return true
		}
		if rest, found := strings.CutPrefix(pattern, "**/"); found {
			for j := range i {
				if ok, _ := path.Match(rest, strings.Join(parts[j:i], "/")); ok {
					return true
				}
			}
		}
	}
	return false
}
