package cli

import (
	"errors"
	"fmt"
	neturl "net/url"
	"os"
	"strings"

	"github.com/nats-io/nats.go"
)

// Conn is the NATS connection grammar of both authbus commands: every
// setting of a connection to NATS, with the same flag and the same
// environment variable in the refresher, its subcommands and every
// publisher command. The variables are the nats CLI's, so a shell set up
// for `nats` is set up for authbus too; each flag is --nats-X for the
// variable NATS_X.
type Conn struct {
	URL         string // comma-separated server URLs
	User        string
	Password    string
	Creds       string // user credentials file (JWT and nkey seed)
	NKey        string // nkey seed file
	CA          string // TLS: certificate authorities to trust
	Cert, Key   string // TLS: client certificate and its key
	InboxPrefix string // reply subjects, for a user allowed only its own inbox
}

// ConnFlag is one flag of Conn.
type ConnFlag struct{ Name, Env string }

// ConnFlags are the flags Conn defines, in the order --help shows them.
var ConnFlags = []ConnFlag{
	{"nats-url", "NATS_URL"},
	{"nats-user", "NATS_USER"},
	{"nats-password", "NATS_PASSWORD"},
	{"nats-creds", "NATS_CREDS"},
	{"nats-nkey", "NATS_NKEY"},
	{"nats-ca", "NATS_CA"},
	{"nats-cert", "NATS_CERT"},
	{"nats-key", "NATS_KEY"},
	{"nats-inbox-prefix", "NATS_INBOX_PREFIX"},
}

// TLSFlags are the flags of Conn about TLS.
var TLSFlags = []string{"nats-ca", "nats-cert", "nats-key"}

// Define adds the connection flags to env's flag set, each bound to its
// variable. defaultURL is --nats-url's default and urlUsage says what it
// means for this command.
func (c *Conn) Define(env *EnvFlags, defaultURL, urlUsage string) {
	fs := env.FlagSet()
	fs.StringVar(&c.URL, "nats-url", defaultURL, urlUsage+"; a comma-separated list for a cluster")
	fs.StringVar(&c.User, "nats-user", "", "NATS user `name`, with --nats-password")
	fs.StringVar(&c.Password, "nats-password", "", "password of --nats-user (prefer the variable to the flag, which other users can see)")
	fs.StringVar(&c.Creds, "nats-creds", "", "NATS user credentials `file` (JWT and nkey seed), instead of a user and password")
	fs.StringVar(&c.NKey, "nats-nkey", "", "NATS nkey seed `file`, instead of a user and password")
	fs.StringVar(&c.CA, "nats-ca", "", "TLS: certificate authorities `file` (PEM) to trust for the NATS servers")
	fs.StringVar(&c.Cert, "nats-cert", "", "TLS: client certificate `file` (PEM), with --nats-key")
	fs.StringVar(&c.Key, "nats-key", "", "TLS: private key `file` (PEM) of --nats-cert")
	fs.StringVar(&c.InboxPrefix, "nats-inbox-prefix", "", "reply inbox `prefix` (default _INBOX), for a tenant user allowed only _INBOX_<tenant>.>")
	for _, f := range ConnFlags {
		env.Bind(f.Name, f.Env)
	}
}

// ErrUsage marks errors about the command line: the commands exit with
// status 2 for them.
var ErrUsage = errors.New("bad usage")

// UsageErrorf returns an error that wraps ErrUsage.
func UsageErrorf(format string, args ...any) error {
	return &usageError{fmt.Errorf(format, args...)}
}

type usageError struct{ err error }

func (e *usageError) Error() string        { return e.err.Error() }
func (e *usageError) Unwrap() error        { return e.err }
func (e *usageError) Is(target error) bool { return target == ErrUsage }

// Check reports every problem of the settings at once, as a usage error
// that says what to change: two ways to authenticate, half a client
// certificate, a file that is not there, an inbox prefix NATS refuses.
func (c *Conn) Check() error {
	var problems []string
	ways := 0
	for _, set := range []bool{c.User != "", c.Creds != "", c.NKey != ""} {
		if set {
			ways++
		}
	}
	if ways > 1 {
		problems = append(problems, "--nats-user, --nats-creds and --nats-nkey are each a way to authenticate: give one")
	}
	if c.Password != "" && c.User == "" {
		problems = append(problems, "--nats-password (NATS_PASSWORD) is set without --nats-user (NATS_USER): give the user too")
	}
	if (c.Cert == "") != (c.Key == "") {
		problems = append(problems, "--nats-cert and --nats-key go together: give both, or neither")
	}
	for _, f := range []struct{ flag, path string }{{"--nats-creds", c.Creds}, {"--nats-nkey", c.NKey}, {"--nats-ca", c.CA}, {"--nats-cert", c.Cert}, {"--nats-key", c.Key}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			problems = append(problems, fmt.Sprintf("%s %s: %v", f.flag, f.path, errors.Unwrap(err)))
		}
	}
	if c.InboxPrefix != "" {
		if err := nats.CustomInboxPrefix(c.InboxPrefix)(&nats.Options{}); err != nil {
			problems = append(problems, fmt.Sprintf("--nats-inbox-prefix %q: give a subject prefix without wildcards or a trailing dot, such as _INBOX_acme", c.InboxPrefix))
		}
	}
	if len(problems) > 0 {
		return UsageErrorf("%s", strings.Join(problems, "; "))
	}
	return nil
}

// TLS reports whether any TLS setting is given.
func (c *Conn) TLS() bool { return c.CA != "" || c.Cert != "" || c.Key != "" }

// Options returns the nats.Options of the settings; call Check first.
func (c *Conn) Options() ([]nats.Option, error) {
	var opts []nats.Option
	if c.User != "" {
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	}
	if c.Creds != "" {
		opts = append(opts, nats.UserCredentials(c.Creds))
	}
	if c.NKey != "" {
		o, err := nats.NkeyOptionFromSeed(c.NKey)
		if err != nil {
			return nil, UsageErrorf("--nats-nkey %s: %v; give a file holding an nkey user seed (SU…)", c.NKey, err)
		}
		opts = append(opts, o)
	}
	if c.CA != "" {
		opts = append(opts, nats.RootCAs(c.CA))
	}
	if c.Cert != "" {
		opts = append(opts, nats.ClientCert(c.Cert, c.Key))
	}
	if c.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(c.InboxPrefix))
	}
	return opts, nil
}

// Connect connects to c.URL with the settings and extra options. Its
// error names the servers without their passwords and says what to check.
func (c *Conn) Connect(extra ...nats.Option) (*nats.Conn, error) {
	opts, err := c.Options()
	if err != nil {
		return nil, err
	}
	nc, err := nats.Connect(c.URL, append(opts, extra...)...)
	if err != nil {
		hint := "is a refresher or NATS server running there? set --nats-url (NATS_URL)"
		if errors.Is(err, nats.ErrAuthorization) {
			hint = "check --nats-user and --nats-password, --nats-creds or --nats-nkey (NATS_USER, NATS_PASSWORD, NATS_CREDS, NATS_NKEY)"
		}
		return nil, fmt.Errorf("connect to NATS at %s: %w; %s", RedactURLs(c.URL), err, hint)
	}
	return nc, nil
}

// RedactURLs hides the passwords of a comma-separated NATS server list, so
// that an error or log line never carries them.
func RedactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, s := range parts {
		if u, err := neturl.Parse(strings.TrimSpace(s)); err == nil {
			parts[i] = u.Redacted()
		} else {
			parts[i] = "(unparsable URL)"
		}
	}
	return strings.Join(parts, ",")
}
