package deploy

import (
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/authbus/authbus/internal/cmdtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(cleanupAfter{m})
}

// cleanupAfter removes the binaries built for the tests after they ran;
// goleak.VerifyTestMain exits the process itself.
type cleanupAfter struct{ m *testing.M }

func (c cleanupAfter) Run() int {
	defer cmdtest.Remove()
	return c.m.Run()
}

var osUnsetenv = os.Unsetenv

// repoRoot is where compose.yaml and the Dockerfile live; tests run in deploy/.
const repoRoot = ".."
