package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
	"github.com/authbus/authbus/workers"
)

func keysCmd(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	if err := runKeys(args, &out, &errOut); err != nil {
		t.Fatalf("refresher keys %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String()
}

// The whole rotation on real NATS: rotate adds an active key and reseals
// every credential, retire drops the old key once nothing uses it, and a
// refresher that holds only the new key still refreshes every credential
// (the sealed refresh tokens survived the rewrite).
func TestKeysRotateResealRetire(t *testing.T) {
	b := fleet.Setup(t)
	path := filepath.Join(t.TempDir(), "seal-keys.json")
	ring, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	oldID := ring.ActiveID()
	b.StartPools(t, 1, func(c *workers.Config) { c.Seal = ring })
	var keys []events.Key
	var fps []string
	for _, k := range []string{"acme.alice.github", "acme.bob.github", "bravo.carol.slack"} {
		key := fleet.MustKey(t, k)
		tok := b.AS.Issue(fleet.ClientID)
		b.Register(t, key, tok, nil)
		keys, fps = append(keys, key), append(fps, events.Fingerprint(tok.AccessToken))
	}
	conn := []string{"--nats-url", b.Srv.ClientURL(), "--seal-key-file", path}

	if out := keysCmd(t, append([]string{"list"}, conn...)...); !strings.Contains(out, oldID+" (active): 3 credentials") {
		t.Errorf("keys list before rotation:\n%s", out)
	}
	out := keysCmd(t, append([]string{"rotate"}, conn...)...)
	if !strings.Contains(out, "resealed 3 of 3 credentials") || !strings.Contains(out, "restart every refresher") {
		t.Errorf("keys rotate:\n%s", out)
	}
	newRing, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil {
		t.Fatal(err)
	}
	if newRing.ActiveID() == oldID {
		t.Fatal("rotate left the old key active")
	}
	b.StopPools(t) // "restart every refresher"

	out = keysCmd(t, append([]string{"retire"}, conn...)...)
	if !strings.Contains(out, "retired keys "+oldID) {
		t.Errorf("keys retire:\n%s", out)
	}
	onlyNew, _, err := kv.LoadOrCreateKeyRing(path)
	if err != nil || !slices.Equal(onlyNew.IDs(), []string{newRing.ActiveID()}) {
		t.Fatalf("key file after retire: %v %v, want only %s", onlyNew.IDs(), err, newRing.ActiveID())
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode after the rewrites: %v %v, want 0600", fi.Mode().Perm(), err)
	}

	b.StartPools(t, 1, func(c *workers.Config) { c.Seal = onlyNew })
	for i, key := range keys {
		w := b.Watch(t, key)
		b.Publish401(t, key, fps[i], "rt", true)
		w.WaitFor(t, "auth.rotated version 2 of "+key.String(), fleet.RotatedVersion(2))
	}
	if calls, reuses := b.AS.Calls(), b.AS.Reuses(); calls != 3 || reuses != 0 {
		t.Errorf("token calls %d, reuses %d; want 3 and 0", calls, reuses)
	}
}

// The daemon refuses a seal key file that group or others can read, and
// says how to fix it.
func TestRefresherRefusesOpenKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "seal-keys.json")
	if _, _, err := kv.LoadOrCreateKeyRing(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	err := run([]string{"--data-dir", dir, "--seal-key-file", path, "--listen", "127.0.0.1:0", "--metrics-addr", ""}, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "chmod 600 "+path) {
		t.Fatalf("refresher with a 0640 key file: %v, want an error saying chmod 600 %s", err, path)
	}
	var out bytes.Buffer
	if err := runKeys([]string{"rotate", "--seal-key-file", path}, &out, &out); err == nil || !strings.Contains(err.Error(), "chmod 600 "+path) {
		t.Fatalf("keys rotate with a 0640 key file: %v, want an error saying chmod 600", err)
	}
}
