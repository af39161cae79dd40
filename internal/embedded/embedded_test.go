package embedded

import (
	"bytes"
	"context"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

const canary = "canary-refresh-token-5e1f"

// storeOnce starts a server on dir, stores the canary in a stream, and
// stops the server.
func storeOnce(t *testing.T, cfg Config) {
	t.Helper()
	s, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	nc, err := nats.Connect("", nats.InProcessServer(s))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "s", []byte(canary)); err != nil {
		t.Fatal(err)
	}
}

func storeContains(t *testing.T, dir string) bool {
	t.Helper()
	found := false
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(canary)) {
			found = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// With JetStreamKey the store holds no plain text, and a restart with the
// same key reads it back; without it the canary is on disk in the clear
// (which shows the check can fail).
func TestJetStreamKeyEncryptsStore(t *testing.T) {
	plain := t.TempDir()
	storeOnce(t, Config{Listen: "127.0.0.1:0", DataDir: plain})
	if !storeContains(t, plain) {
		t.Fatal("the canary is not in an unencrypted store: the check below proves nothing")
	}

	dir := t.TempDir()
	cfg := Config{Listen: "127.0.0.1:0", DataDir: dir, JetStreamKey: "s3cr3t-store-key-for-tests"}
	storeOnce(t, cfg)
	if storeContains(t, dir) {
		t.Fatal("the canary is on disk in the clear despite JetStreamKey")
	}
	s, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	nc, err := nats.Connect("", nats.InProcessServer(s))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := js.Stream(ctx, "S")
	if err != nil {
		t.Fatalf("stream after restart with the key: %v", err)
	}
	msg, err := stream.GetMsg(ctx, 1)
	if err != nil {
		t.Fatalf("message after restart with the key: %v", err)
	}
	if string(msg.Data) != canary {
		t.Fatalf("message after restart with the key: %q", msg.Data)
	}
}

// A config file's users are in force, and its listen address wins over
// Listen; a broken file is an error that says how to check it.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "nats.conf")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if err := os.WriteFile(conf, []byte("listen: "+addr+"\nauthorization { users: [ {user: u, password: p} ] }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Start(Config{Listen: "127.0.0.1:0", DataDir: dir, ConfigFile: conf})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	if s.ClientURL() != "nats://"+addr {
		t.Errorf("client URL %s, want the file's listen address %s", s.ClientURL(), addr)
	}
	if !s.JetStreamEnabled() {
		t.Error("JetStream is off")
	}
	if _, err := nats.Connect(s.ClientURL()); err == nil {
		t.Error("an anonymous client was accepted")
	}
	nc, err := nats.Connect(s.ClientURL(), nats.UserInfo("u", "p"))
	if err != nil {
		t.Fatalf("connect as the file's user: %v", err)
	}
	nc.Close()

	if err := os.WriteFile(conf, []byte("authorization { users: [ \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Start(Config{Listen: "127.0.0.1:0", DataDir: dir, ConfigFile: conf}); err == nil || !strings.Contains(err.Error(), "nats-server -t -c") {
		t.Errorf("broken config: %v", err)
	}
}

// TestSyncsEveryWrite checks that the embedded server is durable on
// acknowledgement (an fsync per write), and that a config file's own
// sync_interval is left as it says.
func TestSyncsEveryWrite(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		always     bool
		interval   time.Duration
	}{
		{"default", "", true, 0},
		{"file sets an interval", "jetstream { sync_interval: 10s }\n", false, 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := Config{Listen: "127.0.0.1:0", DataDir: dir}
			if tc.file != "" {
				cfg.ConfigFile = filepath.Join(dir, "nats.conf")
				if err := os.WriteFile(cfg.ConfigFile, []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s, err := Start(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.Shutdown(); s.WaitForShutdown() }()
			js := s.JetStreamConfig()
			if js.SyncAlways != tc.always || (tc.interval != 0 && js.SyncInterval != tc.interval) {
				t.Errorf("sync always %v interval %v; want always %v interval %v", js.SyncAlways, js.SyncInterval, tc.always, tc.interval)
			}
		})
	}
}
