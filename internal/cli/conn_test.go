package cli_test

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/authbus/authbus/internal/cli"
)

func connFlags(t *testing.T) (*cli.EnvFlags, *cli.Conn) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	env := cli.NewEnvFlags(fs)
	var c cli.Conn
	c.Define(env, "", "servers")
	return env, &c
}

func TestConnReadsTheNATSVariables(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range cli.ConnFlags {
		if want := "NATS_" + strings.ToUpper(strings.ReplaceAll(strings.TrimPrefix(f.Name, "nats-"), "-", "_")); f.Env != want {
			t.Errorf("--%s reads %s; the rule is --nats-X reads NATS_X (%s)", f.Name, f.Env, want)
		}
	}
	t.Setenv("NATS_URL", "nats://a:4222")
	t.Setenv("NATS_CREDS", file)
	t.Setenv("NATS_CA", file)
	t.Setenv("NATS_INBOX_PREFIX", "_INBOX_acme")
	env, c := connFlags(t)
	if err := env.Parse([]string{"--nats-url", "nats://b:4222"}); err != nil {
		t.Fatal(err)
	}
	if c.URL != "nats://b:4222" || c.Creds != file || c.CA != file || c.InboxPrefix != "_INBOX_acme" {
		t.Errorf("conn %+v", *c)
	}
	if err := c.Check(); err != nil {
		t.Error(err)
	}
	if opts, err := c.Options(); err != nil || len(opts) != 3 {
		t.Errorf("Options: %d options, %v; want creds, CA and inbox prefix", len(opts), err)
	}
	for name, want := range map[string]string{"nats-url": "--nats-url", "nats-creds": "NATS_CREDS", "nats-user": ""} {
		if got := env.Origin(name); got != want {
			t.Errorf("Origin(%s) = %q, want %q", name, got, want)
		}
	}
}

func TestConnCheckSaysEveryProblem(t *testing.T) {
	env, c := connFlags(t)
	err := env.Parse([]string{"--nats-user", "u", "--nats-creds", "/no/such/creds", "--nats-cert", "/no/such/cert", "--nats-inbox-prefix", "_INBOX.>"})
	if err != nil {
		t.Fatal(err)
	}
	err = c.Check()
	if !errors.Is(err, cli.ErrUsage) {
		t.Fatalf("Check: %v, want a usage error", err)
	}
	for _, want := range []string{"a way to authenticate: give one", "--nats-cert and --nats-key go together", "--nats-creds /no/such/creds", "--nats-inbox-prefix"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Check: %v\ndoes not say %q", err, want)
		}
	}
	_, c = connFlags(t)
	c.Password = "pw"
	if err := c.Check(); err == nil || !strings.Contains(err.Error(), "without --nats-user") {
		t.Errorf("a password without a user: %v", err)
	}
}
