package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
)

// runPermissions prints the nats-server configuration block of a NATS user:
// a tenant's runtime user, or the refreshers' own. Tenant isolation is
// enforced by these permissions, not by convention (docs/protocol.md,
// "Connecting").
func runPermissions(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("refresher permissions", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned, help goes to stdout
	usage := cli.Usage{Synopsis: `refresher permissions --tenant T [--user NAME] [flags]
       refresher permissions --refresher [--user NAME] [flags]`, About: `
Prints a user entry for the users list of a nats-server configuration
(authorization { users: [ ... ] }, or an account's users): a tenant's runtime
user may publish auth.401 and auth.expiring, request auth.token and
auth.register, and subscribe to auth.rotated and auth.needs_reauth, all of its
own tenant only, plus its own inbox prefix _INBOX_<tenant> (clients must set
it, e.g. nats.CustomInboxPrefix("_INBOX_acme") in Go, --nats-inbox-prefix
with authbus's commands, --inbox-prefix with the nats CLI). A JetStream publish needs nothing more: the server sends the
acknowledgement to the publisher's inbox. The password is a reference to an
environment variable that nats-server resolves when it loads the file.

Password variables: a tenant's is AUTHBUS_PASSWORD_ followed by the tenant
name, written so that no two tenants share a variable. A name of lower-case
letters, digits and '-' that starts with a letter or digit is written in
upper case with '-' as '_' (acme-corp: AUTHBUS_PASSWORD_ACME_CORP). Any other
name is written as '_' followed by each of its characters: a lower-case
letter in upper case, a digit as itself, an upper-case letter as '_' and the
letter, '-' as '__', '_' as '_0' (Acme: AUTHBUS_PASSWORD___ACME, a_b:
AUTHBUS_PASSWORD__A_0B). The first form never starts with '_', the second
always does and reads back one character at a time.

Reserved tenant names, in any letter case, because the deployment's own users
use them or their variables: ` + strings.Join(reservedTenants, ", ") + `.`}
	env := cli.NewEnvFlags(fs)
	var tenants cli.StringList
	var user, prefix, passwordEnv string
	var refresher, serving bool
	fs.Var(&tenants, "tenant", "tenant whose runtime user to print; with --serving, a tenant whose inbox the serving user may answer on (repeatable, or comma-separated)")
	fs.BoolVar(&refresher, "refresher", false, "print the refreshers' own user instead: it writes JetStream and announces events")
	fs.BoolVar(&serving, "serving", false, "print the refreshers' serving user instead: it answers runtimes on their inboxes and nothing else (refresher --nats-serve-user); with --refresher, one user for both")
	fs.StringVar(&user, "user", "", `NATS user name (default "<tenant>-runtime", "authbus-refresher" or "authbus-serve")`)
	fs.StringVar(&passwordEnv, "password-env", "", "environment variable nats-server reads the password from (default AUTHBUS_PASSWORD_ and the encoded tenant, see above, AUTHBUS_PASSWORD_REFRESHER or AUTHBUS_PASSWORD_SERVE)")
	fs.StringVar(&prefix, "prefix", "", "subject prefix (default auth)")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	err := env.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		usage.Print(stdout, fs)
		return err
	}
	if err != nil {
		return cli.UsageErrorf("%v; see refresher permissions --help", err)
	}
	if fs.NArg() > 0 {
		return cli.UsageErrorf("unexpected arguments %q; see refresher permissions --help", fs.Args())
	}
	subj, err := events.NewSubjects(prefix)
	if err != nil {
		return cli.UsageErrorf("--prefix: %w", err)
	}
	for _, t := range tenants {
		if err := checkTenant(t); err != nil {
			return cli.UsageErrorf("%w", err)
		}
	}
	var b userBlock
	tenant := ""
	switch {
	case refresher && serving:
		b = combinedUser(subj, tenants)
	case refresher && len(tenants) > 0:
		return errors.New("give either --tenant or --refresher, not both (--refresher --serving takes the tenants whose inboxes it answers on)")
	case refresher:
		b = refresherUser(subj)
	case serving:
		b = servingUser(subj, tenants)
	case len(tenants) == 1:
		tenant = tenants[0]
		b = tenantUser(subj, tenant)
	case len(tenants) > 1:
		return errors.New("give one --tenant: a runtime user is one tenant's (several only with --serving)")
	default:
		return cli.UsageErrorf("missing --tenant T (a tenant's runtime user), --refresher (the refreshers' user) or --serving (their serving user); see refresher permissions --help")
	}
	if user != "" {
		b.user = user
	}
	if passwordEnv != "" {
		b.passwordEnv = passwordEnv
	}
	if !envName.MatchString(b.passwordEnv) {
		return cli.UsageErrorf("--password-env %q is not a variable name; use letters, digits and _", b.passwordEnv)
	}
	if tenant != "" {
		// A tenant's user must not log in as, or with the password of, one
		// of the deployment's own users.
		for _, r := range reservedTenants {
			if b.passwordEnv == passwordVar(r) {
				return fmt.Errorf("--password-env %s is the password variable of the deployment's %q user; give tenant %q its own", b.passwordEnv, r, tenant)
			}
			if strings.EqualFold(b.user, internalUser(r)) {
				return fmt.Errorf("--user %q is the name of the deployment's %q user; give tenant %q its own", b.user, r, tenant)
			}
		}
	}
	_, err = io.WriteString(stdout, b.String())
	return err
}

// userBlock is one user entry of a nats-server configuration.
type userBlock struct {
	comment          []string
	user             string
	passwordEnv      string
	pubAllow, subAll []string
	allowResponses   bool
}

// checkTenant refuses a tenant name that cannot be a subject token or is
// reserved for the deployment's own users.
func checkTenant(tenant string) error {
	// The tenant becomes a subject token: a wildcard or dot in it would
	// grant other tenants' subjects.
	if err := (events.Key{Tenant: tenant, User: "x", Server: "x"}).Validate(); err != nil {
		return fmt.Errorf("--tenant %q: must be 1-%d characters of [A-Za-z0-9_-]: %w", tenant, events.MaxKeyPartLen, err)
	}
	if i := slices.IndexFunc(reservedTenants, func(r string) bool { return strings.EqualFold(r, tenant) }); i >= 0 {
		return fmt.Errorf("--tenant %q: %q is reserved for the deployment's own users (reserved, in any letter case: %s); choose another tenant name",
			tenant, reservedTenants[i], strings.Join(reservedTenants, ", "))
	}
	return nil
}

// tenantUser is the runtime user of tenant: its own tenant's subjects and
// nothing else. Its events go to the refreshers' intake, not to a stream:
// it never publishes into JetStream, so no JetStream header of its can
// reach another tenant.
func tenantUser(subj events.Subjects, tenant string) userBlock {
	own := func(word string) string { return subj.Prefix() + "." + word + "." + tenant + ".>" }
	inbox := TenantInboxPrefix(tenant)
	return userBlock{
		comment: []string{
			fmt.Sprintf("authbus runtime user of tenant %q.", tenant),
			fmt.Sprintf("Its clients must use the inbox prefix %s (Go: nats.CustomInboxPrefix(%q)).", inbox, inbox),
		},
		user:        tenant + "-runtime",
		passwordEnv: passwordVar(tenant),
		pubAllow: []string{
			own(events.Type401.Word()), own(events.TypeExpiring.Word()),
			own("token"), own("register"),
		},
		subAll: []string{
			own(events.TypeRotated.Word()), own(events.TypeNeedsReauth.Word()),
			inbox + ".>",
		},
	}
}

// refresherUser is the refreshers' user: JetStream (streams, consumers, KV
// buckets, acks, flow control), the work queue its intake writes, the
// proactive-refresh schedules (the server writes what they fire), the
// events it announces, and its own inbox. It serves no runtime: that is the
// serving user's (servingUser), so that no request can make this one, which
// may write every tenant's credentials, answer anywhere.
func refresherUser(subj events.Subjects) userBlock {
	p := subj.Prefix()
	return userBlock{
		comment:     []string{"authbus refresher user: every refresher of the deployment connects as this user (--nats-user)."},
		user:        "authbus-refresher",
		passwordEnv: passwordVar("refresher"),
		pubAllow: []string{
			p + "." + events.TypeRotated.Word() + ".>",
			p + "." + events.TypeNeedsReauth.Word() + ".>",
			subj.ScheduleWildcard(),
			p + ".work.>", p + ".slow.>",
			"$JS.API.>", "$JS.ACK.>", "$JS.FC.>",
			"$KV." + subj.CredentialsBucket() + ".>",
			"$KV." + subj.LeasesBucket() + ".>",
			"$KV." + subj.FailuresBucket() + ".>",
			"_INBOX.>",
		},
		subAll: []string{"_INBOX.>"},
	}
}

// servingUser is the refreshers' serving user (--nats-serve-user): it
// takes the runtimes' requests and events and answers on their inboxes —
// the default _INBOX and each tenant's _INBOX_<tenant> — and may publish
// nothing else. No allow_responses: nats-server would let it answer on any
// reply subject a requester names, deny rules or not.
func servingUser(subj events.Subjects, tenants []string) userBlock {
	pub := []string{"_INBOX.>"}
	for _, t := range tenants {
		pub = append(pub, TenantInboxPrefix(t)+".>")
	}
	return userBlock{
		comment: []string{
			"authbus serving user: every refresher's second connection (--nats-serve-user).",
			"It answers runtimes on their inboxes only; add each tenant with --tenant.",
		},
		user:        "authbus-serve",
		passwordEnv: passwordVar("serve"),
		pubAllow:    pub,
		subAll: []string{
			subj.RegisterWildcard(), subj.TokenWildcard(),
			subj.EventWildcard(events.Type401), subj.EventWildcard(events.TypeExpiring),
			"$SRV.>",
		},
	}
}

// combinedUser is one user for refreshers that serve on their only
// connection: the refresher's rights and the serving user's together.
func combinedUser(subj events.Subjects, tenants []string) userBlock {
	r, sv := refresherUser(subj), servingUser(subj, tenants)
	r.comment = []string{"authbus refresher user, serving runtimes on the same connection (--nats-user without --nats-serve-user)."}
	r.pubAllow = append(r.pubAllow, sv.pubAllow[1:]...)
	r.subAll = append(r.subAll, sv.subAll...)
	return r
}

// TenantInboxPrefix is the inbox prefix a tenant's clients must use.
func TenantInboxPrefix(tenant string) string { return "_INBOX_" + tenant }

// String renders the entry in nats-server configuration syntax.
func (b userBlock) String() string {
	var sb strings.Builder
	for _, c := range b.comment {
		sb.WriteString("# " + c + "\n")
	}
	fmt.Fprintf(&sb, "# nats-server reads the password from $%s when it loads the file.\n", b.passwordEnv)
	sb.WriteString("{\n")
	fmt.Fprintf(&sb, "  user: %s\n", strconv.Quote(b.user))
	fmt.Fprintf(&sb, "  password: $%s\n", b.passwordEnv)
	sb.WriteString("  permissions: {\n")
	fmt.Fprintf(&sb, "    publish: { allow: %s }\n", quoteList(b.pubAllow))
	fmt.Fprintf(&sb, "    subscribe: { allow: %s }\n", quoteList(b.subAll))
	if b.allowResponses {
		sb.WriteString("    allow_responses: true\n")
	}
	sb.WriteString("  }\n}\n")
	return sb.String()
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// reservedTenants are the names the deployment's own users go by in
// deploy/nats/accounts.conf: their password variables are
// AUTHBUS_PASSWORD_<NAME> (the refreshers', their serving connections', the
// operator's, the load generator's, the system account's admin), and authbus and sys name the
// accounts. A tenant called "refresher" would otherwise get the
// refreshers' password variable, and with it their rights. Sorted.
var reservedTenants = []string{"admin", "authbus", "operator", "refresher", "serve", "storm", "sys", "system"}

// internalUser is the NATS user name of a reserved name's user in
// deploy/nats/accounts.conf.
func internalUser(reserved string) string {
	if reserved == "admin" {
		return "admin"
	}
	return "authbus-" + reserved
}

// passwordVar is the environment variable nats-server reads the password
// of tenant's user from. The encoding is injective (see the --help text):
// the common names (lower case, digits, '-') keep the readable form they
// always had, every other name is escaped behind a leading '_', which the
// readable form never starts with.
func passwordVar(tenant string) string {
	const prefix = "AUTHBUS_PASSWORD_"
	if plainTenant.MatchString(tenant) {
		return prefix + strings.ToUpper(strings.ReplaceAll(tenant, "-", "_"))
	}
	var sb strings.Builder
	sb.WriteString(prefix + "_")
	for _, r := range tenant {
		switch {
		case r >= 'a' && r <= 'z':
			sb.WriteRune(r - 'a' + 'A')
		case r >= 'A' && r <= 'Z':
			sb.WriteRune('_')
			sb.WriteRune(r)
		case r == '-':
			sb.WriteString("__")
		case r == '_':
			sb.WriteString("_0")
		default: // a digit; tenants are [A-Za-z0-9_-]
			sb.WriteRune(r)
		}
	}
	return sb.String()
}

// plainTenant is a tenant name whose password variable is simply its upper
// case with '-' as '_'.
var plainTenant = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)
