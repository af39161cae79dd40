package main

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
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
func binaries(t *testing.T) string {
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
