package main

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/fleet"
)

// The refresher and publisher binaries, built once for every test of this
// package that runs them as a user would.
var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// binaries builds cmd/refresher and cmd/publisher on first use and returns
// the folder that holds them.
func binaries(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "authbus-bin-"); binErr != nil {
			return
		}
		build := exec.Command("go", "build", "-o", binDir+"/", "github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher")
		if out, err := build.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
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
