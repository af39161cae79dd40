package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	authclient "github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/telemetry"
)

// Exit statuses, listed in the top-level help so scripts can branch on them.
const (
	exitOK          = 0
	exitFailure     = 1 // could not do it: NATS unreachable, timeout, refresher unavailable
	exitUsage       = 2 // bad flags, arguments or input; the message says what to fix
	exitNotFound    = 3 // the credential is not registered
	exitNeedsReauth = 4 // the credential needs a person to log in again
)

// errUsage marks errors about the command line or the input given to it.
var errUsage = cli.ErrUsage

// usageErrorf returns an error that exits with exitUsage.
func usageErrorf(format string, args ...any) error { return cli.UsageErrorf(format, args...) }

// errNotRegistered is what operator commands return for a key that has no
// credential record.
var errNotRegistered = errors.New("credential not registered")

// errReauth is what a command returns when the credential turned out to
// need a new login.
var errReauth = errors.New("credential needs a new login")

// serviceError is an error answer of the token or register service.
type serviceError struct {
	Status string            // Nats-Service-Error-Code: "400", "404", …
	Reply  events.ErrorReply // the JSON body
}

func (e *serviceError) Error() string {
	desc := e.Reply.ErrorDescription
	if desc == "" {
		desc = "the refresher gave no description; see its log"
	}
	code := e.Reply.Error
	if code == "" {
		code = events.CodeOf(e.Status)
	}
	return code + ": " + desc
}

// exitCode maps an error to the exit status the top-level help documents.
func exitCode(err error) int {
	var se *serviceError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &se):
		switch events.CodeOf(se.Status) {
		case events.CodeInvalidRequest:
			return exitUsage
		case events.CodeNotFound:
			return exitNotFound
		case events.CodeNeedsReauth:
			return exitNeedsReauth
		}
		return exitFailure
	case errors.Is(err, errNotRegistered), errors.Is(err, authclient.ErrNotFound):
		return exitNotFound
	case errors.Is(err, errReauth), errors.As(err, new(*authclient.NeedsReauthError)):
		return exitNeedsReauth
	case errors.Is(err, authclient.ErrRefused):
		return exitUsage
	case errors.Is(err, errUsage), errors.Is(err, events.ErrInvalidKey), errors.Is(err, events.ErrInvalidSubject),
		errors.Is(err, events.ErrInvalidRequest), errors.Is(err, events.ErrInvalidEvent):
		return exitUsage
	}
	return exitFailure
}

// globals are the settings every command takes, before or after its
// name: the NATS connection (cli.Conn, the refresher's grammar too), the
// subject prefix and how long to wait for an answer.
type globals struct {
	conn    cli.Conn
	prefix  string
	timeout time.Duration
	subj    events.Subjects
}

// commonFlags are the flags of globals besides the connection's.
var commonFlags = cli.Group{Title: "Flags of every command", Names: []string{"prefix", "timeout"}}

// define adds the flags of globals to env's flag set, each bound to its
// environment variable.
func (g *globals) define(env *cli.EnvFlags) {
	fs := env.FlagSet()
	fs.StringVar(&g.prefix, "prefix", events.DefaultPrefix, "authbus subject prefix")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	fs.DurationVar(&g.timeout, "timeout", 5*time.Second, "how long to wait for each answer")
	env.Bind("timeout", "AUTHBUS_TIMEOUT")
	g.conn.Define(env, nats.DefaultURL, "NATS server URL")
}

// cmdFlags is the flag set of one command: its own flags plus the
// connection flags, each bound to its environment variable.
type cmdFlags struct {
	*flag.FlagSet
	env      *cli.EnvFlags
	g        globals
	s        streams
	synopsis string // "token [flags] KEY"
	about    string // what the command does, for --help
}

// newFlags returns the flag set of a command; define the command's own
// flags on it, then call parse.
func newFlags(name, synopsis, about string, s streams) *cmdFlags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	// Errors and help are printed by parse and run, to the right stream.
	fs.SetOutput(io.Discard)
	f := &cmdFlags{FlagSet: fs, env: cli.NewEnvFlags(fs), s: s, synopsis: synopsis, about: about}
	f.g.define(f.env)
	return f
}

// bind ties a command flag to an environment variable.
func (f *cmdFlags) bind(name, env string) { f.env.Bind(name, env) }

// parse parses args: flags may come before, between and after the
// positional arguments ("--" ends flags). On --help it prints the usage to
// stdout and returns flag.ErrHelp.
func (f *cmdFlags) parse(args []string) error {
	err := f.env.Parse(args)
	var positional []string
	for err == nil && f.NArg() > 0 {
		// flag stops at the first non-flag; take it and go on, unless the
		// caller ended flags with "--".
		rest := f.Args()
		consumed := args[:len(args)-len(rest)]
		if len(consumed) > 0 && consumed[len(consumed)-1] == "--" {
			positional = append(positional, rest...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
		err = f.Parse(args)
	}
	if errors.Is(err, flag.ErrHelp) {
		f.printUsage()
		return err
	}
	if err != nil {
		return usageErrorf("%v; run \"publisher %s --help\" for the flags", err, f.Name())
	}
	// Re-parsing only the positionals leaves them as Args().
	_ = f.Parse(append([]string{"--"}, positional...))
	if f.g.subj, err = events.NewSubjects(f.g.prefix); err != nil {
		return usageErrorf("--prefix: %w", err)
	}
	if f.g.timeout <= 0 {
		return usageErrorf("--timeout %v: give a positive duration such as 5s", f.g.timeout)
	}
	return f.g.conn.Check()
}

func (f *cmdFlags) printUsage() {
	cli.Usage{
		Synopsis: "publisher " + f.synopsis,
		About:    f.about,
		Groups:   []cli.Group{commonFlags, cli.ConnGroup()},
		Footer:   "Flags may also come after the arguments.",
	}.Print(f.s.out, f.FlagSet)
}

// oneKey parses the single KEY argument of a command.
func (f *cmdFlags) oneKey() (events.Key, error) {
	if f.NArg() != 1 {
		return events.Key{}, usageErrorf("want exactly one KEY argument (tenant.user.server), got %d; run \"publisher %s --help\"", f.NArg(), f.Name())
	}
	return events.ParseKey(f.Arg(0))
}

// keys parses one or more KEY arguments.
func (f *cmdFlags) keys() ([]events.Key, error) {
	if f.NArg() == 0 {
		return nil, usageErrorf("want one or more KEY arguments (tenant.user.server); run \"publisher %s --help\"", f.Name())
	}
	keys := make([]events.Key, 0, f.NArg())
	for _, a := range f.Args() {
		k, err := events.ParseKey(a)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// client is one command's NATS connection.
type client struct {
	nc *nats.Conn
	g  *globals
}

// connect connects with the connection flags.
func (f *cmdFlags) connect() (*client, error) {
	g := &f.g
	nc, err := g.conn.Connect(nats.Name("authbus-publisher "+f.Name()), nats.Timeout(g.timeout))
	if err != nil {
		return nil, err
	}
	return &client{nc: nc, g: g}, nil
}

func (c *client) close() { c.nc.Close() }

// tracer is the global tracer: a no-op unless the process installs a
// provider. Trace context still flows: a parent from the TRACEPARENT
// environment variable (see traceContext) reaches the refresher through
// the headers.
func tracer() trace.Tracer { return otel.Tracer("github.com/authbus/authbus/cmd/publisher") }

// traceContext returns ctx with the remote parent named by the TRACEPARENT
// and TRACESTATE environment variables, if set, so a script's trace
// continues through the publisher (OpenTelemetry's environment-variable
// carrier convention).
func traceContext(ctx context.Context) context.Context {
	carrier := propagation.MapCarrier{}
	if v := os.Getenv("TRACEPARENT"); v != "" {
		carrier["traceparent"] = v
	}
	if v := os.Getenv("TRACESTATE"); v != "" {
		carrier["tracestate"] = v
	}
	if len(carrier) == 0 {
		return ctx
	}
	return propagation.TraceContext{}.Extract(ctx, carrier)
}

func messagingAttrs(op, subject string, k events.Key) trace.SpanStartOption {
	return trace.WithAttributes(
		attribute.String("messaging.system", "nats"),
		attribute.String("messaging.operation.type", op),
		attribute.String("messaging.destination.name", subject),
		attribute.String("authbus.credential.key", k.String()),
	)
}

// endSpan ends span, marking it failed when err is set. Error texts name
// keys, subjects and fields, never tokens.
func endSpan(span trace.Span, err error) {
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// timeoutError explains a timed-out request or publish: with NATS, a
// request the server refused for lack of permission looks like a timeout,
// and the refusal arrives separately as the connection's last error.
func (c *client) timeoutError(subject string, err error) error {
	if last := c.nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) {
		return fmt.Errorf("%s: %w (%v); check the NATS user's permissions for %s and its reply inbox (--nats-inbox-prefix)", subject, err, last, subject)
	}
	return fmt.Errorf("%s: no answer within %v (%w); is a refresher running? raise --timeout if it is busy", subject, c.g.timeout, err)
}

// request sends a request to the service word ("token", "register") of k
// with the trace context in its headers, and decodes a successful JSON
// answer into out. An error answer is a *serviceError carrying the
// service's code and description.
func (c *client) request(ctx context.Context, word string, k events.Key, body []byte, out any) (err error) {
	subject := c.g.subj.Token(k)
	if word == "register" {
		subject = c.g.subj.Register(k)
	}
	ctx, cancel := context.WithTimeout(ctx, c.g.timeout)
	defer cancel()
	ctx, span := tracer().Start(ctx, "request auth."+word, trace.WithSpanKind(trace.SpanKindClient), messagingAttrs("send", subject, k))
	defer func() { endSpan(span, err) }()
	msg := nats.NewMsg(subject)
	msg.Data = body
	telemetry.Inject(ctx, msg.Header)
	reply, err := c.nc.RequestMsgWithContext(ctx, msg)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("no refresher answers on %s: start one (go run ./cmd/refresher) or check --prefix", subject)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		return c.timeoutError(subject, err)
	case err != nil:
		return fmt.Errorf("request %s: %w", subject, err)
	}
	if status := reply.Header.Get("Nats-Service-Error-Code"); status != "" {
		se := &serviceError{Status: status}
		if json.Unmarshal(reply.Data, &se.Reply) != nil || se.Reply.ErrorDescription == "" {
			se.Reply.ErrorDescription = reply.Header.Get("Nats-Service-Error")
		}
		return se
	}
	if err := json.Unmarshal(reply.Data, out); err != nil {
		return fmt.Errorf("decode the answer on %s: %w; is the refresher the same authbus version?", subject, err)
	}
	return nil
}

// clientOptions are the settings of the connection flags that the runtime
// commands hand to the client library.
func (c *client) clientOptions() []authclient.Option {
	return []authclient.Option{authclient.WithPrefix(c.g.prefix), authclient.WithRequestTimeout(c.g.timeout),
		authclient.WithLogger(slog.New(slog.DiscardHandler))}
}

// explain words an error of the client library as the publisher's own
// errors read: a needs-re-auth error starts with the protocol's code, as
// the service's answer does.
func explain(err error) error {
	if errors.As(err, new(*authclient.NeedsReauthError)) {
		return fmt.Errorf("%s: %w", events.CodeNeedsReauth, err)
	}
	return err
}

// writeJSON prints v as one line of JSON.
func writeJSON(s streams, v any) error { return json.NewEncoder(s.out).Encode(v) }

// ago describes how far t is from now: "in 59m", "3m ago".
func ago(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := t.Sub(now).Round(time.Second)
	if d == 0 {
		return "now"
	}
	if d > 0 {
		return "in " + shortDuration(d)
	}
	return shortDuration(-d) + " ago"
}

func shortDuration(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	case d >= time.Hour:
		return strings.TrimSuffix((d - d%time.Minute).String(), "0s")
	case d >= time.Minute && d%time.Minute == 0:
		return strings.TrimSuffix(d.String(), "0s") // "4m", not "4m0s"
	}
	return d.String()
}
