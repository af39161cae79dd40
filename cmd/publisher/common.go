package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
)

// conn holds the flags every command shares.
type conn struct {
	url     string
	prefix  string
	timeout time.Duration
	subj    events.Subjects
}

// newFlagSet returns a flag set with the shared connection flags bound.
func newFlagSet(name, synopsis string, stderr io.Writer, c *conn) (*flag.FlagSet, *cli.EnvFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: publisher %s\n\nFlags (each also read from the environment variable shown):\n", synopsis)
		fs.PrintDefaults()
	}
	env := cli.NewEnvFlags(fs)
	fs.StringVar(&c.url, "nats-url", nats.DefaultURL, "NATS server URL")
	env.Bind("nats-url", "NATS_URL")
	fs.StringVar(&c.prefix, "prefix", events.DefaultPrefix, "subject prefix")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	fs.DurationVar(&c.timeout, "timeout", 5*time.Second, "how long to wait for an answer")
	env.Bind("timeout", "AUTHBUS_TIMEOUT")
	return fs, env
}

// parse parses args and checks the shared flags.
func (c *conn) parse(env *cli.EnvFlags, args []string) error {
	if err := env.Parse(args); err != nil {
		return err
	}
	s, err := events.NewSubjects(c.prefix)
	if err != nil {
		return err
	}
	c.subj = s
	return nil
}

func (c *conn) connect() (*nats.Conn, error) {
	nc, err := nats.Connect(c.url, nats.Name("authbus-publisher"), nats.Timeout(c.timeout))
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s: %w; is the refresher running? set --nats-url or NATS_URL", c.url, err)
	}
	return nc, nil
}

// keyArg parses the one KEY argument of a command.
func keyArg(fs *flag.FlagSet) (events.Key, error) {
	if fs.NArg() != 1 {
		return events.Key{}, fmt.Errorf("want exactly one KEY argument (tenant.user.server), got %d; see --help", fs.NArg())
	}
	return events.ParseKey(fs.Arg(0))
}

// errService is a request the service answered with an error.
var errService = errors.New("service error")

// request sends a request and decodes a successful JSON answer into out.
// Error answers (micro's Nats-Service-Error headers) become errors that
// carry the service's description.
func (c *conn) request(ctx context.Context, nc *nats.Conn, subject string, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msg, err := nc.RequestWithContext(ctx, subject, body)
	if errors.Is(err, nats.ErrNoResponders) {
		return fmt.Errorf("no refresher answers on %s: start one (go run ./cmd/refresher) or check --prefix", subject)
	}
	if err != nil {
		return fmt.Errorf("request %s: %w", subject, err)
	}
	if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
		var er events.ErrorReply
		_ = json.Unmarshal(msg.Data, &er)
		desc := er.ErrorDescription
		if desc == "" {
			desc = msg.Header.Get("Nats-Service-Error")
		}
		return fmt.Errorf("%w %s (%s): %s", errService, code, er.Error, desc)
	}
	if err := json.Unmarshal(msg.Data, out); err != nil {
		return fmt.Errorf("decode answer from %s: %w", subject, err)
	}
	return nil
}
