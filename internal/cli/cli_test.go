package cli_test

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/cli"
)

func newFlags(t *testing.T) (*cli.EnvFlags, *string, *string, *time.Duration) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	addr := fs.String("metrics-addr", "127.0.0.1:9464", "listener")
	prefix := fs.String("prefix", "auth", "prefix")
	ttl := fs.Duration("lease-ttl", time.Minute, "lease")
	env := cli.NewEnvFlags(fs)
	env.BindEmpty("metrics-addr", "TEST_METRICS_ADDR")
	env.Bind("prefix", "TEST_PREFIX")
	env.Bind("lease-ttl", "TEST_LEASE_TTL")
	return env, addr, prefix, ttl
}

func TestEnvFallbacks(t *testing.T) {
	for _, tc := range []struct {
		name       string
		env        map[string]string
		args       []string
		addr, pref string
		ttl        time.Duration
	}{
		{name: "defaults", addr: "127.0.0.1:9464", pref: "auth", ttl: time.Minute},
		{name: "variables", env: map[string]string{"TEST_METRICS_ADDR": ":9000", "TEST_PREFIX": "corp", "TEST_LEASE_TTL": "5s"},
			addr: ":9000", pref: "corp", ttl: 5 * time.Second},
		{name: "flags win", env: map[string]string{"TEST_PREFIX": "corp", "TEST_LEASE_TTL": "5s"}, args: []string{"--prefix=x", "--lease-ttl=7s"},
			addr: "127.0.0.1:9464", pref: "x", ttl: 7 * time.Second},
		// BindEmpty: "" is a value (the listener off); Bind: "" is unset.
		{name: "empty", env: map[string]string{"TEST_METRICS_ADDR": "", "TEST_PREFIX": "", "TEST_LEASE_TTL": ""},
			addr: "", pref: "auth", ttl: time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			env, addr, prefix, ttl := newFlags(t)
			if err := env.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if *addr != tc.addr || *prefix != tc.pref || *ttl != tc.ttl {
				t.Errorf("metrics-addr %q prefix %q lease-ttl %s, want %q %q %s", *addr, *prefix, *ttl, tc.addr, tc.pref, tc.ttl)
			}
		})
	}
}

func TestEnvMalformedNamesTheVariable(t *testing.T) {
	t.Setenv("TEST_LEASE_TTL", "soon")
	env, _, _, _ := newFlags(t)
	err := env.Parse(nil)
	if err == nil || !strings.Contains(err.Error(), "TEST_LEASE_TTL") {
		t.Fatalf("Parse = %v, want an error naming TEST_LEASE_TTL", err)
	}
}

func TestRedactURLs(t *testing.T) {
	got := cli.RedactURLs("nats://svc:hunter2@n1:4222,nats://n2:4222")
	if strings.Contains(got, "hunter2") || !strings.Contains(got, "n1:4222") || !strings.Contains(got, "nats://n2:4222") {
		t.Errorf("RedactURLs = %q", got)
	}
}
