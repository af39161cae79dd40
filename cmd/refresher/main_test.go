package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
)

// TestREADMEQuickStart runs the README's commands with the real binaries: a
// refresher on the embedded default, then publisher register, 401 and watch,
// then SIGTERM and a clean exit.
func TestREADMEQuickStart(t *testing.T) {
	bin := binaries(t)
	as := authtest.New(t)
	as.AddClient("demo", "demo-secret")
	tok := as.Issue("demo")

	dataDir := t.TempDir()
	addr := freeAddr(t)
	natsURL := "nats://" + addr
	refresher := exec.Command(filepath.Join(bin, "refresher"), "--data-dir", dataDir, "--listen", addr)
	// Set but empty turns the operations listener off, as --metrics-addr="" does.
	refresher.Env = append(cleanEnv(), "AUTHBUS_METRICS_ADDR=")
	_, refLog, exited := startRefresher(t, refresher)
	if strings.Contains(refLog.String(), "metrics and health listener running") {
		t.Errorf("AUTHBUS_METRICS_ADDR= left the operations listener on:\n%s", refLog.String())
	}

	publisher := func(stdin string, args ...string) *exec.Cmd {
		cmd := exec.Command(filepath.Join(bin, "publisher"), args...)
		cmd.Env = append(cleanEnv(), "NATS_URL="+natsURL, "AUTHBUS_CLIENT_SECRET=demo-secret")
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

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// cleanEnv is the test's environment without authbus settings, so a
// developer's shell does not change what the test runs.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AUTHBUS_") && !strings.HasPrefix(kv, "NATS_") {
			env = append(env, kv)
		}
	}
	return env
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

func TestRedactURLs(t *testing.T) {
	got := redactURLs("nats://svc:hunter2@n1:4222,nats://n2:4222")
	if strings.Contains(got, "hunter2") || !strings.Contains(got, "n1:4222") || !strings.Contains(got, "nats://n2:4222") {
		t.Errorf("redactURLs = %q", got)
	}
}
