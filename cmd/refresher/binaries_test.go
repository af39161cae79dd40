package main

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
)

func TestMain(m *testing.M) {
	code := m.Run()
	cmdtest.Remove()
	os.Exit(code)
}

// startRefresher starts cmd, a refresher, with its output captured, and
// waits until it is ready. exited yields Wait's result once; the process
// is killed when the test ends if it still runs.
func startRefresher(t testing.TB, cmd *exec.Cmd) (stdout, stderr *fleet.LogBuffer, exited <-chan error) {
	t.Helper()
	stdout, stderr = &fleet.LogBuffer{}, &fleet.LogBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-done
		}
	})
	waitForText(t, stderr, "refresher ready", 30*time.Second)
	return stdout, stderr, done
}
