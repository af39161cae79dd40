package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
)

// Done-when 6: the built refresher prints its spans with
// OTEL_TRACES_EXPORTER=console and prints nothing at all with no OTEL_*
// variable set; either way its operations listener serves /metrics with
// the refresh it made, /readyz and /healthz, and stops with the process.
func TestBinaryTelemetry(t *testing.T) {
	bin := cmdtest.Binaries(t)
	as := authtest.New(t)
	as.AddClient("demo", "demo-secret")

	for _, tc := range []struct {
		name      string
		env       []string
		wantSpans bool
	}{
		{"console", []string{"OTEL_TRACES_EXPORTER=console"}, true},
		{"nothing set", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, metricsAddr := cmdtest.FreeAddr(t), cmdtest.FreeAddr(t)
			cmd := exec.Command(filepath.Join(bin, "refresher"), "--data-dir", t.TempDir(), "--listen", addr, "--metrics-addr", metricsAddr)
			cmd.Env = append(envWithoutOTel(), tc.env...)
			stdout, stderr, exited := startRefresher(t, cmd)
			waitForText(t, stderr, "metrics and health listener running", 5*time.Second)

			tok := as.Issue("demo")
			rotatedVersion := refreshOnce(t, "nats://"+addr, as, tok)
			if rotatedVersion != 2 {
				t.Fatalf("auth.rotated version %d, want 2", rotatedVersion)
			}

			client := &http.Client{Timeout: 5 * time.Second}
			defer client.CloseIdleConnections()
			get := func(path string) (int, string) {
				t.Helper()
				resp, err := client.Get("http://" + metricsAddr + path)
				if err != nil {
					t.Fatalf("GET %s: %v", path, err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(b)
			}
			// auth.rotated goes out before the event is settled and counted.
			fleet.Eventually(t, 10*time.Second, "/metrics counts the rotation", func() bool {
				code, body := get("/metrics")
				return code == 200 && strings.Contains(body, `authbus_events_processed_total{`) && strings.Contains(body, `outcome="rotated"`)
			})
			if code, body := get("/readyz"); code != 200 {
				t.Errorf("/readyz = %d %q", code, body)
			}

			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("no exit within 30s of SIGTERM\n%s", stderr.String())
			}
			if c, err := net.DialTimeout("tcp", metricsAddr, time.Second); err == nil {
				c.Close()
				t.Error("the metrics listener still accepts connections after exit")
			}

			out := stdout.String()
			if !tc.wantSpans {
				if out != "" {
					t.Errorf("with no OTEL_* set the refresher printed:\n%.2000s", out)
				}
				return
			}
			if out == "" {
				t.Fatalf("OTEL_TRACES_EXPORTER=console printed no spans; log:\n%s", stderr.String())
			}
			names := map[string]bool{}
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				var span struct{ Name string }
				if err := json.Unmarshal([]byte(line), &span); err != nil {
					t.Fatalf("console exporter line is not a JSON span: %v\n%.500s", err, line)
				}
				names[span.Name] = true
			}
			for _, want := range []string{"process auth.401.*.*.*", "lease claim", "POST", "store credential", "send auth.rotated.*.*.*"} {
				if !names[want] {
					t.Errorf("no %q span printed; got %v", want, names)
				}
			}
			for _, secret := range []string{tok.AccessToken, tok.RefreshToken, "demo-secret"} {
				if strings.Contains(out, secret) || strings.Contains(stderr.String(), secret) {
					t.Errorf("a secret (%.6s…) reached the printed spans or the log", secret)
				}
			}
			if !strings.Contains(stderr.String(), "trace_id=") {
				t.Error("no log line names its trace_id while tracing")
			}
		})
	}
}

// refreshOnce registers tok, reports a 401 for it and returns the version
// of the auth.rotated that follows.
func refreshOnce(t *testing.T, url string, as *authtest.Server, tok authtest.Tokens) int64 {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	key, _ := events.ParseKey("acme.alice.github")
	subj, _ := events.NewSubjects("")
	rotated, err := nc.SubscribeSync(subj.Event(events.TypeRotated, key))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, TokenType: "Bearer", RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: as.TokenURL(), ClientID: "demo", ClientSecret: "demo-secret",
	})
	reply, err := nc.Request(subj.Register(key), body, 10*time.Second)
	if err != nil || reply.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("register: %v %s", err, reply.Data)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	fp := events.Fingerprint(tok.AccessToken)
	data, _ := events.Encode(key, "test/rt", events.Unauthorized{Fingerprint: fp, Runtime: "rt", Status: 401})
	if _, err := js.Publish(context.Background(), subj.Event(events.Type401, key), data, jetstream.WithMsgID(events.MsgID(events.Type401, key, fp))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := rotated.NextMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("no auth.rotated version 2: %v", err)
		}
		ev, err := events.Decode(events.TypeRotated, key, m.Data)
		if err == nil && ev.Rotated.Version >= 2 {
			return ev.Rotated.Version
		}
	}
}

// envWithoutOTel is cleanEnv without OTEL_* variables either.
func envWithoutOTel() []string {
	var env []string
	for _, kv := range cmdtest.CleanEnv() {
		if !strings.HasPrefix(kv, "OTEL_") {
			env = append(env, kv)
		}
	}
	return env
}
