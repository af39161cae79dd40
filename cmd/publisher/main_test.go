package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
)

func TestMain(m *testing.M) {
	// The commands read their settings from the environment: a developer's
	// shell must not change what the tests run.
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "AUTHBUS_") || strings.HasPrefix(name, "NATS_") || name == "TRACEPARENT" || name == "TRACESTATE" {
			os.Unsetenv(name)
		}
	}
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// bundle is an authbus installation with one refresher pool, and a way to
// run publisher commands against it.
type bundle struct {
	*fleet.Fleet
	url string
}

func setup(t *testing.T) *bundle {
	t.Helper()
	f := fleet.Setup(t)
	f.StartPools(t, 1, nil)
	return &bundle{Fleet: f, url: f.Srv.ClientURL()}
}

// result is one finished command.
type result struct {
	code        int
	out, errOut string
}

// publisher runs a command line against the bundle's server.
func (b *bundle) publisher(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return runCmd(t, context.Background(), stdin, append([]string{"--nats-url", b.url}, args...)...)
}

func runCmd(t *testing.T, ctx context.Context, stdin string, args ...string) result {
	t.Helper()
	var out, errOut fleet.LogBuffer
	code := run(ctx, args, strings.NewReader(stdin), &out, &errOut)
	return result{code: code, out: out.String(), errOut: errOut.String()}
}

// want fails the test unless the command exited with code.
func (r result) want(t *testing.T, code int) result {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.out, r.errOut)
	}
	return r
}

// registerArgs registers tok under key with flags, the way an operator
// who has the tokens in the environment would.
func (b *bundle) register(t *testing.T, key string, tok authtest.Tokens) events.RegisterReply {
	t.Helper()
	tokenJSON := fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer","refresh_token":%q,"expires_in":3600}`, tok.AccessToken, tok.RefreshToken)
	r := b.publisher(t, tokenJSON, "register", "--json", "--token-endpoint", b.AS.TokenURL(),
		"--client-id", fleet.ClientID, "--client-secret", fleet.ClientSecret, "--token-file", "-", key).want(t, 0)
	var reply events.RegisterReply
	if err := json.Unmarshal([]byte(r.out), &reply); err != nil {
		t.Fatalf("register --json output %q: %v", r.out, err)
	}
	return reply
}

func mustJSON[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("output is not the JSON expected (%T): %v\n%s", v, err, s)
	}
	return v
}

func mustNotContain(t *testing.T, what, s string, secrets ...string) {
	t.Helper()
	for _, secret := range secrets {
		if secret != "" && strings.Contains(s, secret) {
			t.Errorf("%s shows a secret (%.8s…):\n%s", what, secret, s)
		}
	}
}

// ---------------------------------------------------------------- help

func TestTopLevelHelpListsEveryCommand(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		r := runCmd(t, context.Background(), "", args...).want(t, 0)
		for _, c := range commands {
			if !strings.Contains(r.out, "\n  "+c.name+" ") || !strings.Contains(r.out, c.summary) {
				t.Errorf("%v: no line for %s:\n%s", args, c.name, r.out)
			}
		}
		for _, want := range []string{"--nats-url", "NATS_URL", "--prefix", "--timeout", "--nats-inbox-prefix", "Exit status"} {
			if !strings.Contains(r.out, want) {
				t.Errorf("%v: top-level help does not mention %s", args, want)
			}
		}
	}
	// No command at all is a usage error, with the usage on stderr.
	r := runCmd(t, context.Background(), "").want(t, 2)
	if !strings.Contains(r.errOut, "Commands:") {
		t.Errorf("no usage on stderr:\n%s", r.errOut)
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	t.Parallel()
	for _, c := range commands {
		for _, args := range [][]string{{c.name, "--help"}, {"help", c.name}, {"--prefix", "x", c.name, "-h"}} {
			r := runCmd(t, context.Background(), "", args...)
			if r.code != 0 || !strings.HasPrefix(r.out, "Usage: publisher "+c.name) {
				t.Errorf("%v: exit %d, stdout:\n%s\nstderr:\n%s", args, r.code, r.out, r.errOut)
				continue
			}
			for _, want := range []string{"--nats-url", "NATS_URL", "--timeout", "--nats-inbox-prefix", "NATS connection flags:"} {
				if !strings.Contains(r.out, want) {
					t.Errorf("%s --help does not mention %s", c.name, want)
				}
			}
		}
	}
}

// ---------------------------------------------------------------- bad input

func TestBadInputExitsTwoSayingWhatToDo(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		want  string // in stderr
	}{
		{"unknown command", "", []string{"frobnicate"}, `unknown command "frobnicate"; the commands are register, 401, expiring, token, watch, status, delete, revoke`},
		{"help of unknown command", "", []string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{"unknown flag", "", []string{"token", "--nope", "a.b.c"}, `run "publisher token --help"`},
		{"unknown top-level flag", "", []string{"--nope", "token"}, "flag provided but not defined"},
		{"no key", "", []string{"token"}, "want exactly one KEY argument (tenant.user.server), got 0"},
		{"two keys", "", []string{"token", "a.b.c", "a.b.d"}, "want exactly one KEY argument"},
		{"bad key", "", []string{"token", "acme..github"}, "user (part 2) is empty; keys are tenant.user.server"},
		{"bad prefix", "", []string{"token", "--prefix", "a b", "a.b.c"}, "--prefix"},
		{"bad timeout", "", []string{"token", "--timeout", "-1s", "a.b.c"}, "give a positive duration"},
		{"bad inbox prefix", "", []string{"token", "--nats-inbox-prefix", "_INBOX.>", "a.b.c"}, "--nats-inbox-prefix"},
		{"fingerprint not hex", "", []string{"401", "--fingerprint", "not-a-fingerprint", "a.b.c"}, "16 lowercase hex characters"},
		{"fingerprint and token", "", []string{"401", "--fingerprint", "0123456789abcdef", "--access-token", "x", "a.b.c"}, "not both"},
		{"expiring without expiry", "", []string{"expiring", "--fingerprint", "0123456789abcdef", "a.b.c"}, "--expires-at"},
		{"register without client", "", []string{"register", "--token-endpoint", "https://as.example/token", "--access-token", "at", "a.b.c"}, "client_id"},
		{"register empty stdin", "", []string{"register", "--token-file", "-", "--token-endpoint", "https://as.example/token", "--client-id", "c", "a.b.c"}, "empty; give the token response JSON"},
		{"register not JSON", "access_token=x", []string{"register", "--token-file", "-", "--token-endpoint", "https://as.example/token", "--client-id", "c", "a.b.c"}, "not a token response JSON object"},
		{"register bad expiry", "", []string{"register", "--expires-at", "tomorrow", "a.b.c"}, "write it like 2026-11-23T20:00:00Z"},
		{"watch bad pattern", "", []string{"watch", "a.b.c.d"}, "pattern \"a.b.c.d\""},
		{"watch bad type", "", []string{"watch", "--types", "rotated,bogus"}, "\"bogus\" is not an event type"},
		{"status bad pattern", "", []string{"status", "acme.>.x"}, "NATS wildcards"},
		{"delete no key", "", []string{"delete"}, "want one or more KEY arguments"},
		{"delete pattern", "", []string{"delete", "acme.*.github"}, "keys are tenant.user.server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Nothing listens here: bad input must be refused before connecting.
			r := runCmd(t, context.Background(), tc.stdin, append([]string{"--nats-url", "nats://127.0.0.1:1"}, tc.args...)...)
			if r.code != 2 || !strings.Contains(r.errOut, tc.want) {
				t.Errorf("exit %d, stderr:\n%s\nwant exit 2 and %q", r.code, r.errOut, tc.want)
			}
		})
	}
}

// A service's invalid_request answer is bad input too, and an unreachable
// server is a failure (1) that says what to set.
func TestServiceErrorsAndUnreachableServer(t *testing.T) {
	t.Parallel()
	b := setup(t)
	r := b.publisher(t, "", "register", "--token-endpoint", "https://as.example/token", "--client-id", "c",
		"--access-token", "at", "--grant", "client_credentials", "a.b.c").want(t, 2)
	if !strings.Contains(r.errOut, "client_secret") {
		t.Errorf("stderr does not name the missing field:\n%s", r.errOut)
	}
	r = runCmd(t, context.Background(), "", "token", "--nats-url", "nats://127.0.0.1:1", "--timeout", "500ms", "a.b.c").want(t, 1)
	if !strings.Contains(r.errOut, "set --nats-url (NATS_URL)") {
		t.Errorf("unreachable server: stderr does not say what to set:\n%s", r.errOut)
	}
	r = b.publisher(t, "", "--prefix", "other", "token", "a.b.c").want(t, 1)
	if !strings.Contains(r.errOut, "no refresher answers") {
		t.Errorf("no responders: %s", r.errOut)
	}
}

// A flag the rest of the command line makes meaningless is refused.
func TestIgnoredFlagsAreRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"401", "--recheck", "1s", "a.b.c"}, "--recheck paces the waiting of --wait"},
		{[]string{"login", "--device", "--no-browser", "--issuer", "http://127.0.0.1:1", "--client-id", "c", "a.b.c"}, "--no-browser is for the browser login"},
		{[]string{"storm", "--nats-user", "u"}, "--nats-user applies to a deployment's NATS"},
	} {
		r := runCmd(t, context.Background(), "", tc.args...).want(t, 2)
		if !strings.Contains(r.errOut, tc.want) {
			t.Errorf("%q: stderr %q, want %q", tc.args, r.errOut, tc.want)
		}
	}
	t.Run("storm with NATS_URL alone", func(t *testing.T) {
		t.Setenv("NATS_URL", "nats://u:secret-pw@127.0.0.1:1")
		r := runCmd(t, context.Background(), "", "storm").want(t, 2)
		if !strings.Contains(r.errOut, "NATS_URL is set") || !strings.Contains(r.errOut, "Pass --nats-url") || strings.Contains(r.errOut, "secret-pw") {
			t.Errorf("storm with NATS_URL exported: %q", r.errOut)
		}
	})
}
