package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
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

// The refresher binary with --nats-config: its embedded server enforces the
// file's users, the refresher connects as its own user (NATS_USER and
// NATS_PASSWORD), one that stores and serves, and a tenant's runtime, with the printed permissions and
// inbox prefix, registers, reports a 401 and gets the rotation. After
// SIGTERM, `refresher keys list` starts its own embedded server on the same
// data directory and configuration and finds the credential.
func TestRefresherWithNATSConfig(t *testing.T) {
	bin := cmdtest.Binaries(t)
	as := authtest.New(t)
	as.AddClient(fleet.ClientID, fleet.ClientSecret)
	passwords := []string{"AUTHBUS_PASSWORD_ACME=pw-acme", "AUTHBUS_PASSWORD_REFRESHER=pw-refresher"}
	for _, p := range passwords {
		k, v, _ := strings.Cut(p, "=")
		t.Setenv(k, v) // for permissionsBlock and runKeys, which run in this process
	}
	dir := t.TempDir()
	confPath := filepath.Join(dir, "nats.conf")
	conf := fmt.Sprintf("authorization {\n  users: [\n%s\n%s\n  ]\n}\n",
		permissionsBlock(t, "--tenant", "acme"), permissionsBlock(t, "--refresher", "--serving", "--tenant", "acme"))
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(dir, "data")
	addr := cmdtest.FreeAddr(t)
	refresher := exec.Command(filepath.Join(bin, "refresher"), "--data-dir", dataDir, "--listen", addr,
		"--nats-config", confPath, "--metrics-addr", "",
		// With users configured loopback token endpoints are refused,
		// unless asked for: the test authorization server is one.
		"--allow-loopback-token-hosts")
	refresher.Env = append(append(cmdtest.CleanEnv(), passwords...), "NATS_USER=authbus-refresher", "NATS_PASSWORD=pw-refresher")
	_, refLog, exited := startRefresher(t, refresher)

	if nc, err := nats.Connect("nats://" + addr); err == nil {
		nc.Close()
		t.Fatal("an anonymous connection was accepted: --nats-config is not in force")
	}
	nc, err := nats.Connect("nats://"+addr, nats.UserInfo("acme-runtime", "pw-acme"),
		nats.CustomInboxPrefix(TenantInboxPrefix("acme")))
	if err != nil {
		t.Fatalf("connect as acme's runtime: %v", err)
	}
	t.Cleanup(nc.Close)
	rotated := make(chan *nats.Msg, 8)
	if _, err := nc.ChanSubscribe("auth.rotated.acme.>", rotated); err != nil {
		t.Fatal(err)
	}
	subj, _ := events.NewSubjects("")
	key := fleet.MustKey(t, "acme.alice.github")
	tok := as.Issue(fleet.ClientID)
	body, _ := json.Marshal(events.RegisterRequest{
		Token:         events.RegisterToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresIn: tok.ExpiresIn},
		TokenEndpoint: as.TokenURL(), ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
	})
	msg, err := nc.Request(subj.Register(key), body, 10*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("acme registers its credential: %v %s", err, msg.Data)
	}
	var reg events.RegisterReply
	if err := json.Unmarshal(msg.Data, &reg); err != nil || reg.Version != 1 {
		t.Fatalf("register reply %s: %v", msg.Data, err)
	}
	waitRotated(t, rotated, 1)
	js, _ := jetstream.New(nc)
	data, _ := events.Encode(key, "test/acme", events.Unauthorized{Fingerprint: reg.Fingerprint, Runtime: "acme"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.Publish(ctx, subj.Event(events.Type401, key), data); err != nil {
		t.Fatalf("acme reports a 401: %v", err)
	}
	waitRotated(t, rotated, 2)
	if calls, reuses := as.Calls(), as.Reuses(); calls != 1 || reuses != 0 {
		t.Errorf("token calls %d, reuses %d; want 1 and 0", calls, reuses)
	}

	if err := refresher.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("refresher exit after SIGTERM: %v\n%s", err, refLog.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("refresher did not exit within 30s of SIGTERM\n%s", refLog.String())
	}

	out := keysCmd(t, "list", "--data-dir", dataDir, "--listen", addr, "--nats-config", confPath,
		"--nats-user", "authbus-refresher", "--nats-password", "pw-refresher")
	if !strings.Contains(out, "(active): 1 credentials") {
		t.Errorf("keys list on the stopped refresher's data directory:\n%s", out)
	}
}
