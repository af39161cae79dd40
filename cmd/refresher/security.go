package main

import (
	"flag"
	"io"

	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/workers/egress"
)

// dispatch runs a subcommand, or the daemon when args name none.
func dispatch(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "keys":
			return runKeys(args[1:], stdout, stderr)
		case "permissions":
			return runPermissions(args[1:], stdout, stderr)
		case "help":
			if len(args) > 1 {
				return dispatch(append(args[1:2], "--help"), stdout, stderr)
			}
			args = []string{"--help"}
		}
	}
	return run(args, stdout, stderr)
}

// securityOptions are the daemon's flags about what it may reach and who it
// is on NATS.
type securityOptions struct {
	allowedTokenHosts              cli.StringList
	allowPrivateHosts              bool
	allowLoopbackHosts             bool
	natsConfig                     string
	natsServeUser, natsServePasswd string
}

func bindSecurityFlags(fs *flag.FlagSet, env *cli.EnvFlags, o *securityOptions) {
	fs.Var(&o.allowedTokenHosts, "allowed-token-hosts", "comma-separated host patterns token endpoints must match, e.g. *.okta.com,auth.example.com (default any public host)")
	env.Bind("allowed-token-hosts", "AUTHBUS_ALLOWED_TOKEN_HOSTS")
	fs.BoolVar(&o.allowPrivateHosts, "allow-private-token-hosts", false, "allow token endpoints on private addresses (10/8, 172.16/12, 192.168/16, fc00::/7), for an authorization server inside the network; link-local and metadata addresses stay refused")
	env.Bind("allow-private-token-hosts", "AUTHBUS_ALLOW_PRIVATE_TOKEN_HOSTS")
	fs.BoolVar(&o.allowLoopbackHosts, "allow-loopback-token-hosts", false, "allow token endpoints on localhost (allowed by default only in the embedded dev mode: without --nats-url and without --nats-config)")
	env.Bind("allow-loopback-token-hosts", "AUTHBUS_ALLOW_LOOPBACK_TOKEN_HOSTS")
	fs.StringVar(&o.natsConfig, "nats-config", "", "nats-server configuration file for the embedded server (users and permissions, TLS, limits); see refresher permissions")
	env.Bind("nats-config", "AUTHBUS_NATS_CONFIG")
	fs.StringVar(&o.natsServeUser, "nats-serve-user", "", "NATS user of a second connection that serves runtimes (auth.register, auth.token, the intake of auth.401/auth.expiring), allowed to answer on inboxes only; see refresher permissions --serving")
	env.Bind("nats-serve-user", "NATS_SERVE_USER")
	fs.StringVar(&o.natsServePasswd, "nats-serve-password", "", "password of --nats-serve-user (prefer the environment variable to the flag)")
	env.Bind("nats-serve-password", "NATS_SERVE_PASSWORD")
}

// tokenHosts is the SSRF policy: loopback is allowed in the embedded dev
// mode, so the README's quick start with a local test server works, but
// not once --nats-config configures users: then tenants register, and any
// of them could make the refresher call a service on the refresher's own
// machine and read parts of its answer back.
func (o securityOptions) tokenHosts(embedded bool) egress.Policy {
	return egress.Policy{
		Allowed:       o.allowedTokenHosts,
		AllowLoopback: (embedded && o.natsConfig == "") || o.allowLoopbackHosts,
		AllowPrivate:  o.allowPrivateHosts,
	}
}
