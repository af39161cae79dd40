package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
)

// TestREADMEQuickStart runs the README's commands with the real binaries: a
// refresher on the embedded default, then publisher register, 401 and watch,
// then SIGTERM and a clean exit.
func TestREADMEQuickStart(t *testing.T) {
	bin := cmdtest.Binaries(t)
	as := authtest.New(t)
	as.AddClient("demo", "demo-secret")
	tok := as.Issue("demo")

	dataDir := t.TempDir()
	addr := cmdtest.FreeAddr(t)
	natsURL := "nats://" + addr
	refresher := exec.Command(filepath.Join(bin, "refresher"), "--data-dir", dataDir, "--listen", addr)
	// Set but empty turns the operations listener off, as --metrics-addr="" does.
	refresher.Env = append(cmdtest.CleanEnv(), "AUTHBUS_METRICS_ADDR=")
	_, refLog, exited := startRefresher(t, refresher)
	if strings.Contains(refLog.String(), "metrics and health listener running") {
		t.Errorf("AUTHBUS_METRICS_ADDR= left the operations listener on:\n%s", refLog.String())
	}

	publisher := func(stdin string, args ...string) *exec.Cmd {
		cmd := exec.Command(filepath.Join(bin, "publisher"), args...)
		cmd.Env = append(cmdtest.CleanEnv(), "NATS_URL="+natsURL, "AUTHBUS_CLIENT_SECRET=demo-secret")
		cmd.Stdin = strings.NewReader(stdin)
		return cmd
	}
	watch := publisher("", "watch", "--count", "2", "--for", "30s", "acme.alice.github")
	var watchOut, watchErr fleet.LogBuffer
	watch.Stdout, watch.Stderr = &watchOut, &watchErr
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	waitForText(t, &watchErr, "watching", 10*time.Second)

	tokenJSON := fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer","refresh_token":%q,"expires_in":3600}`, tok.AccessToken, tok.RefreshToken)
	out, err := publisher(tokenJSON, "register", "--token-endpoint", as.TokenURL(), "--client-id", "demo", "--token-file", "-", "acme.alice.github").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "registered acme.alice.github: version 1") {
		t.Fatalf("publisher register: %v\n%s", err, out)
	}
	out, err = publisher("", "401", "--access-token", tok.AccessToken, "acme.alice.github").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "published auth.401.acme.alice.github") {
		t.Fatalf("publisher 401: %v\n%s", err, out)
	}
	if err := watch.Wait(); err != nil {
		t.Fatalf("publisher watch: %v\nstdout:\n%s\nstderr:\n%s", err, watchOut.String(), watchErr.String())
	}
	if !strings.Contains(watchOut.String(), "auth.rotated acme.alice.github version=2") {
		t.Errorf("watch did not show the rotation:\n%s", watchOut.String())
	}
	if got := as.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1", got)
	}
	for _, secret := range []string{tok.AccessToken, tok.RefreshToken, "demo-secret"} {
		if strings.Contains(watchOut.String(), secret) || strings.Contains(refLog.String(), secret) {
			t.Errorf("a secret (%.6s…) reached watch output or the refresher log", secret)
		}
	}
	fi, err := os.Stat(filepath.Join(dataDir, "seal-keys.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("seal key file: %v mode %v, want 0600", err, fi.Mode().Perm())
	}

	if err := refresher.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("refresher exit after SIGTERM: %v\n%s", err, refLog.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("refresher did not exit within 30s of SIGTERM\n%s", refLog.String())
	}
	if !strings.Contains(refLog.String(), "refresher stopped") {
		t.Errorf("no clean-stop log line:\n%s", refLog.String())
	}
}

func TestHelpDocumentsEveryFlagAndVariable(t *testing.T) {
	var out bytes.Buffer
	_, err := parseFlags([]string{"--help"}, &out)
	if err == nil {
		t.Fatal("--help did not stop parsing")
	}
	for _, want := range []string{"--nats-url", "NATS_URL", "-listen", "AUTHBUS_LISTEN", "-data-dir", "AUTHBUS_DATA_DIR",
		"-seal-key-file", "-workers", "AUTHBUS_WORKERS", "-token-timeout", "-lease-ttl", "-log-format", "-shutdown-timeout"} {
		if !strings.Contains(out.String(), strings.TrimPrefix(want, "-")) {
			t.Errorf("--help does not mention %s", want)
		}
	}
}

func TestEnvironmentFallbackAndErrors(t *testing.T) {
	t.Setenv("AUTHBUS_WORKERS", "17")
	o, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil || o.pool.Workers != 17 {
		t.Errorf("AUTHBUS_WORKERS=17: workers %d, err %v", o.pool.Workers, err)
	}
	o, err = parseFlags([]string{"--workers", "3"}, &bytes.Buffer{})
	if err != nil || o.pool.Workers != 3 {
		t.Errorf("flag over env: workers %d, err %v", o.pool.Workers, err)
	}
	t.Setenv("AUTHBUS_WORKERS", "many")
	if _, err := parseFlags(nil, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "AUTHBUS_WORKERS") {
		t.Errorf("bad AUTHBUS_WORKERS: err %v, want one naming the variable", err)
	}
}

func waitForText(t testing.TB, b *fleet.LogBuffer, text string, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(b.String(), text) {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%q did not appear within %v:\n%s", text, d, b.String())
		}
	}
}

// Flags that the chosen mode would ignore are refused, naming where each
// came from (a flag, or a variable exported for another command).
func TestRefresherRefusesFlagsItWouldIgnore(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want []string
	}{
		{name: "listen with nats-url", args: []string{"--nats-url", "nats://n:4222", "--listen", "127.0.0.1:5222"},
			want: []string{"--listen sets up the embedded NATS server, which --nats-url replaces"}},
		{name: "nats-config with NATS_URL", env: map[string]string{"NATS_URL": "nats://n:4222"}, args: []string{"--nats-config", "/etc/nats.conf"},
			want: []string{"--nats-config sets up the embedded NATS server, which NATS_URL replaces"}},
		{name: "TLS in the embedded mode", args: []string{"--nats-ca", "/dev/null"},
			want: []string{"--nats-ca applies with --nats-url only", "in process"}},
		{name: "two ways to authenticate", args: []string{"--nats-url", "nats://n:4222", "--nats-user", "u", "--nats-nkey", "/dev/null"},
			want: []string{"give one"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := parseFlags(tc.args, &bytes.Buffer{})
			if !errors.Is(err, cli.ErrUsage) {
				t.Fatalf("parseFlags(%q): %v, want a usage error (exit 2)", tc.args, err)
			}
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
		})
	}
	// A variable exported for the embedded mode is not refused when the
	// command line joins a deployment, but not dropped silently either.
	t.Setenv("AUTHBUS_LISTEN", "127.0.0.1:5222")
	o, err := parseFlags([]string{"--nats-url", "nats://n:4222"}, &bytes.Buffer{})
	if err != nil || len(o.ignored) != 1 || !strings.Contains(o.ignored[0], "AUTHBUS_LISTEN is set but ignored: it sets up the embedded NATS server, which --nats-url replaces") {
		t.Errorf("AUTHBUS_LISTEN with --nats-url: %v, warnings %q", err, o.ignored)
	}
	// The same settings in the mode they belong to are fine.
	if _, err := parseFlags([]string{"--listen", "127.0.0.1:5222", "--nats-user", "u", "--nats-password", "p"}, &bytes.Buffer{}); err != nil {
		t.Errorf("embedded mode with --listen and a user: %v", err)
	}
	if _, err := parseFlags([]string{"--nats-url", "nats://n:4222", "--nats-ca", "/dev/null"}, &bytes.Buffer{}); err != nil {
		t.Errorf("--nats-url with --nats-ca: %v", err)
	}
}

// A refresher that cannot reach NATS leaves nothing on disk: the seal key
// file is created only once the connection works.
func TestNothingIsWrittenBeforeTheRefresherCanRun(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "keys", "seal-keys.json")
	err := run([]string{"--nats-url", "nats://127.0.0.1:1", "--seal-key-file", keyFile, "--data-dir", filepath.Join(dir, "data"), "--metrics-addr", ""},
		&bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "connect to NATS") {
		t.Fatalf("run against nothing: %v, want a connection error", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Errorf("a refresher that could not connect wrote %v into %s", entries, dir)
	}
}

// --help and help print to stdout and succeed, for the daemon and its
// subcommands alike; a missing subcommand is a usage error.
func TestHelpGoesToStdout(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"help", "keys"}, {"keys", "--help"}, {"keys", "list", "--help"}, {"permissions", "--help"}} {
		var stdout, stderr bytes.Buffer
		err := dispatch(args, &stdout, &stderr)
		if err != nil && !errors.Is(err, flag.ErrHelp) {
			t.Errorf("%q: %v", args, err)
		}
		if !strings.HasPrefix(stdout.String(), "Usage: refresher") || stderr.Len() > 0 {
			t.Errorf("%q: stdout %q, stderr %q; want the usage on stdout only", args, firstLine(stdout.String()), stderr.String())
		}
	}
	if err := dispatch([]string{"keys"}, &bytes.Buffer{}, &bytes.Buffer{}); !errors.Is(err, cli.ErrUsage) {
		t.Errorf("refresher keys: %v, want a usage error", err)
	}
}

func firstLine(s string) string { line, _, _ := strings.Cut(s, "\n"); return line }
