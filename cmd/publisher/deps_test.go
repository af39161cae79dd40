package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestBinaryLinksNoTestPackages keeps the test harness out of the binary
// operators install: the storm's and the development server's
// authorization server is internal/authserver, and nothing the publisher
// imports may reach testing or net/http/httptest (internal/authtest,
// internal/natstest and internal/fleet are for tests only).
func TestBinaryLinksNoTestPackages(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-deps", "github.com/authbus/authbus/cmd/publisher").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 || !strings.Contains(string(out), "github.com/authbus/authbus/internal/authserver\n") {
		t.Fatalf("go list -deps printed no dependency list:\n%s", out)
	}
	for _, dep := range deps {
		switch dep {
		case "testing", "net/http/httptest",
			"github.com/authbus/authbus/internal/authtest",
			"github.com/authbus/authbus/internal/natstest",
			"github.com/authbus/authbus/internal/fleet":
			t.Errorf("cmd/publisher links %s; it is for tests only", dep)
		}
	}
}
