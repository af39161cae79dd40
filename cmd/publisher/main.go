// Command publisher is the operator's and runtime's CLI for authbus: register
// a credential, report a 401 or an expiring token, print the current token,
// watch events, show and forget credentials.
//
// Runtime commands (register, 401, expiring, token, watch) speak the wire
// protocol only, so a tenant's NATS user may run them on its own keys (with
// --nats-inbox-prefix when its user may only receive on its own inbox prefix).
// Operator commands (status, delete) read and write the authbus streams and
// buckets directly and need a NATS user with JetStream access to them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/attribute"

	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/telemetry"
)

// A command is one subcommand: its name, a one-line summary for the
// top-level help, and the function that runs it with the arguments after
// its name (connection flags given before the name come first).
type command struct {
	name    string
	args    string // what follows the name in the top-level help
	summary string
	run     func(ctx context.Context, args []string, s streams) error
}

// commands is the subcommand table; adding a command is one entry here.
var commands = []command{
	{"register", "KEY", "store fresh tokens for a credential and how to refresh them", register},
	{"401", "KEY", "report that a request with a credential's token got HTTP 401", unauthorized},
	{"expiring", "KEY", "report that a credential's token expires soon", expiring},
	{"token", "KEY", `print the current access token (curl -H "Authorization: Bearer $(publisher token KEY)")`, token},
	{"watch", "[PATTERN…]", "follow auth.rotated and auth.needs_reauth events (access tokens hidden)", watch},
	{"status", "[KEY|TENANT|PATTERN…]", "show credentials: version, state, expiry, last rotation, lease (operator)", status},
	{"delete", "KEY…", "forget credentials: record, pending refresh, kept needs_reauth (operator)", deleteCmd},
	{"revoke", "KEY…", "revoke the tokens at the authorization server (RFC 7009), then delete (operator)", revokeCmd},
	{"import", "PATH…", "register the tokens MCP clients saved on disk (MCP SDK token stores, x/oauth2 tokens)", importCmd},
	{"login", "KEY", "log in at an authorization server (browser with PKCE, or --device) and register the tokens", login},
	{"devserver", "", "run a development authorization server on loopback, to try login and rotation", devserver},
	{"storm", "", "load test: a 401 storm through naive, in-process and authbus refreshing, side by side", stormCmd},
	{"soak", "", "load test: a steady fleet for minutes, with runtimes using the tokens, an outage, refresher restarts", soakCmd},
}

// streams are the standard streams of one run, so tests can run commands
// as function calls.
type streams struct {
	in          io.Reader
	out, errOut io.Writer
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// Spans go where the OTEL_* environment says; with none set, nowhere.
	_, shutdown, err := telemetry.Setup(ctx, telemetry.Config{ServiceName: "authbus-publisher"})
	if err != nil {
		fmt.Fprintf(os.Stderr, "publisher: %v\n", err)
		os.Exit(exitUsage)
	}
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	flush, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := shutdown(flush); err != nil {
		fmt.Fprintf(os.Stderr, "publisher: %v\n", err)
	}
	cancel()
	os.Exit(code)
}

// run runs the command line args and returns the exit status (see
// usage). Cancelling ctx stops a command that waits (watch, 401 --wait).
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	s := streams{in: stdin, out: stdout, errOut: stderr}
	// Connection flags may come before the command name; they are handed on
	// to the command, which parses them with their environment fallbacks.
	top := flag.NewFlagSet("publisher", flag.ContinueOnError)
	top.SetOutput(io.Discard)
	new(globals).define(cli.NewEnvFlags(top))
	err := top.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, usage())
		return exitOK
	case err != nil:
		fmt.Fprintf(stderr, "publisher: %v\n\n%s", err, usage())
		return exitUsage
	case top.NArg() == 0:
		fmt.Fprint(stderr, usage())
		return exitUsage
	}
	name, rest := top.Arg(0), top.Args()[1:]
	if name == "help" {
		if len(rest) == 0 {
			fmt.Fprint(stdout, usage())
			return exitOK
		}
		name, rest = rest[0], []string{"--help"}
	}
	i := slices.IndexFunc(commands, func(c command) bool { return c.name == name })
	if i < 0 {
		fmt.Fprintf(stderr, "publisher: unknown command %q; the commands are %s. Run \"publisher --help\" for what each does.\n", name, commandNames())
		return exitUsage
	}
	cmdArgs := append(slices.Clone(args[:len(args)-top.NArg()]), rest...)
	// One trace per run: the spans of its requests and publishes are
	// children of the command's, itself a child of TRACEPARENT if set.
	ctx, span := tracer().Start(traceContext(ctx), "publisher "+name)
	err = commands[i].run(ctx, cmdArgs, s)
	if errors.Is(err, flag.ErrHelp) {
		err = nil
	}
	code := exitCode(err)
	span.SetAttributes(attribute.Int("process.exit.code", code))
	endSpan(span, err)
	if err != nil {
		fmt.Fprintf(stderr, "publisher %s: %v\n", name, err)
	}
	return code
}

func commandNames() string {
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	return strings.Join(names, ", ")
}

func usage() string {
	var b strings.Builder
	b.WriteString("Usage: publisher [connection flags] <command> [flags] [args]\n\nCommands:\n")
	width := 0
	for _, c := range commands {
		width = max(width, len(c.name)+1+len(c.args))
	}
	for _, c := range commands {
		fmt.Fprintf(&b, "  %-*s  %s\n", width, c.name+" "+c.args, c.summary)
	}
	b.WriteString(`
KEY is tenant.user.server, each part [A-Za-z0-9_-]{1,64}. A PATTERN is a key
with NATS wildcards (acme.*.github, acme.>) or a tenant (acme).

Flags of every command, accepted before or after the command name (each
reads the environment variable shown; "publisher <command> --help" says
more):
  --prefix P            authbus subject prefix (AUTHBUS_PREFIX; default auth)
  --timeout D           how long to wait for each answer (AUTHBUS_TIMEOUT; default 5s)
  --nats-url URL        NATS servers (NATS_URL; default nats://127.0.0.1:4222)
  --nats-user NAME      NATS user (NATS_USER), with --nats-password (NATS_PASSWORD)
  --nats-creds FILE     NATS user credentials file (NATS_CREDS)
  --nats-nkey FILE      NATS nkey seed file (NATS_NKEY)
  --nats-ca FILE        TLS certificate authorities (NATS_CA)
  --nats-cert FILE      TLS client certificate (NATS_CERT), with --nats-key FILE (NATS_KEY)
  --nats-inbox-prefix P reply inbox prefix, for a tenant user allowed only
                        _INBOX_<tenant>.> (NATS_INBOX_PREFIX)

status and delete read and write the authbus streams and buckets directly:
they need a NATS user with JetStream access to them, not a tenant's user.

Exit status: 0 done; 1 failed (NATS unreachable, timeout, refresher
unavailable); 2 bad flags, arguments or input (the message says what to fix);
3 credential not registered; 4 credential needs a new login.

Run "publisher <command> --help" for the flags of a command.
`)
	return b.String()
}
