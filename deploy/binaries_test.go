package deploy

import (
	"bytes"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
)

// helpText runs a command with --help and returns what it printed.
func helpText(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, append(args, "--help")...)
	cmd.Env = cmdtest.CleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v --help: %v\n%s", filepath.Base(bin), args, err, out)
	}
	return string(out)
}

var (
	helpFlag = regexp.MustCompile(`(?m)^  --?([a-z0-9][a-z0-9-]*)(?: (\S+))?\s*$`)
	helpEnv  = regexp.MustCompile(`\(env ([A-Z][A-Z0-9_]*)\)`)
)

// helpFlags returns the flags a --help text documents, with whether each
// takes a value, and the environment variables it names.
func helpFlags(help string) (flags map[string]bool, envs map[string]bool) {
	flags, envs = map[string]bool{}, map[string]bool{}
	for _, m := range helpFlag.FindAllStringSubmatch(help, -1) {
		flags[m[1]] = m[2] != ""
	}
	for _, m := range helpEnv.FindAllStringSubmatch(help, -1) {
		envs[m[1]] = true
	}
	return flags, envs
}

// otelVariables are the OpenTelemetry SDK environment variables compose.yaml
// may pass (a typo is a variable nobody reads).
var otelVariables = []string{
	"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED", "OTEL_PROPAGATORS",
	"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER",
	"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
	"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
	"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TIMEOUT",
}

// TestComposeFlagsAndVariablesExist runs every authbus command line of
// compose.yaml through the real binary's flag parser (with --help appended,
// so it stops after parsing, in the service's environment) and checks each
// variable the service sets against the binary: named in --help, an
// OpenTelemetry SDK variable (and the binary carries the SDK's exporter
// selection), or Go's own SSL_CERT_DIR/SSL_CERT_FILE.
func TestComposeFlagsAndVariablesExist(t *testing.T) {
	c := loadCompose(t)
	bins := cmdtest.Binaries(t)
	for _, name := range slices.Sorted(maps.Keys(c.Services)) {
		s := c.Services[name]
		if s.Build == nil {
			continue
		}
		t.Run(name, func(t *testing.T) {
			bin := filepath.Join(bins, s.Build.Target)
			args := slices.Clone(s.Command)
			var sub []string
			if s.Build.Target == "publisher" {
				if len(args) == 0 {
					t.Fatal("publisher service without a command")
				}
				sub, args = slices.Clone(args[:1]), args[1:]
			}
			flags, envs := helpFlags(helpText(t, bin, sub...))
			for _, a := range args {
				name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
				takesValue, ok := flags[name]
				switch {
				case !strings.HasPrefix(a, "--"):
					t.Errorf("argument %q: write flags as --name=value", a)
				case !ok:
					t.Errorf("flag --%s does not exist (%s --help)", name, strings.Join(append([]string{s.Build.Target}, sub...), " "))
				case takesValue && !hasValue:
					t.Errorf("flag --%s takes a value: write --%s=VALUE", name, name)
				case !takesValue && hasValue && value != "true" && value != "false":
					t.Errorf("flag --%s is boolean, given %q", name, value)
				}
			}
			binary, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			for v := range s.Environment {
				switch {
				case envs[v]:
				case slices.Contains(otelVariables, v):
					if !bytes.Contains(binary, []byte("go.opentelemetry.io/contrib/exporters/autoexport")) {
						t.Errorf("%s is set, but %s does not build its exporters from the OTEL_* environment", v, s.Build.Target)
					}
				case v == "SSL_CERT_DIR" || v == "SSL_CERT_FILE":
				default:
					t.Errorf("environment %s is read by nothing: not in %s --help, not an OTel SDK variable", v, s.Build.Target)
				}
			}

			// The real parser, with the real values and environment.
			cmd := exec.Command(bin, append(append(sub, args...), "--help")...)
			cmd.Env = cmdtest.CleanEnv()
			for k, v := range s.Environment {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s rejects the compose command line: %v\n%s", strings.Join(append([]string{s.Build.Target}, sub...), " "), err, lastLines(string(out), 5))
			}
		})
	}
}

// TestRefresherHealthcheck runs the refresher the compose health check
// probes, on its embedded default, with the compose --metrics-addr port
// rewritten to a free one, and runs the health check command itself.
func TestRefresherHealthcheck(t *testing.T) {
	c := loadCompose(t)
	bins := cmdtest.Binaries(t)
	s := c.Services["refresher-1"]
	addr, _ := flagValue(s.Command, "metrics-addr")
	_, port, _ := net.SplitHostPort(addr)
	opsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cmdtest.FreePort(t)))
	probe := slices.Clone(s.Healthcheck.Test[1:])
	for i, a := range probe {
		probe[i] = strings.Replace(a, "127.0.0.1:"+port, opsAddr, 1)
		if probe[i] == a && strings.HasPrefix(a, "http") {
			t.Fatalf("healthcheck URL %q is not on the --metrics-addr port %s", a, port)
		}
	}
	probe[0] = filepath.Join(bins, filepath.Base(probe[0]))

	runProbe := func() error {
		out, err := exec.Command(probe[0], probe[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := runProbe(); err == nil {
		t.Fatal("the health check passes with no refresher running")
	}
	ref := exec.Command(filepath.Join(bins, "refresher"), "--listen", net.JoinHostPort("127.0.0.1", strconv.Itoa(cmdtest.FreePort(t))),
		"--data-dir", t.TempDir(), "--metrics-addr="+opsAddr)
	ref.Env = cmdtest.CleanEnv()
	var log fleet.LogBuffer
	ref.Stdout, ref.Stderr = &log, &log
	if err := ref.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ref.Wait() }()
	defer func() {
		_ = ref.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = ref.Process.Kill()
			<-done
		}
	}()
	fleet.Eventually(t, 30*time.Second, "the compose health check passes", func() bool { return runProbe() == nil })
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
