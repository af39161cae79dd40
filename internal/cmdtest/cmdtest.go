// Package cmdtest is for tests that run the authbus commands as a person
// or a deployment would: it builds the binaries once per test process and
// gives them an environment and addresses of their own. The README tests of
// cmd/refresher and the deployment tests of deploy share it, and with it
// the build cache.
package cmdtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var (
	once sync.Once
	dir  string
	err  error
)

// Binaries builds cmd/refresher, cmd/publisher and deploy/probe on first
// use and returns the folder that holds them. Call Remove from TestMain
// when the tests have run.
func Binaries(t testing.TB) string {
	t.Helper()
	once.Do(func() {
		if dir, err = os.MkdirTemp("", "authbus-bin-"); err != nil {
			return
		}
		build := exec.Command("go", "build", "-o", dir+"/", "github.com/authbus/authbus/cmd/refresher",
			"github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe")
		if out, berr := build.CombinedOutput(); berr != nil {
			err = fmt.Errorf("go build: %v\n%s", berr, out)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// Remove deletes the binaries Binaries built, if any.
func Remove() {
	if dir != "" {
		os.RemoveAll(dir)
	}
}

// CleanEnv is the test process's environment without authbus, NATS or
// OpenTelemetry settings, so that a developer's shell does not change what
// a test runs.
func CleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AUTHBUS_") && !strings.HasPrefix(kv, "NATS_") && !strings.HasPrefix(kv, "OTEL_") {
			env = append(env, kv)
		}
	}
	return env
}

// FreeAddr returns a loopback address no one listens on right now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreePort is FreeAddr's port.
func FreePort(t testing.TB) int {
	t.Helper()
	_, port, _ := net.SplitHostPort(FreeAddr(t))
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
