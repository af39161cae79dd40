package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/authbus/authbus/internal/soak"
)

func soakCmd(ctx context.Context, args []string, s streams) error {
	f := newFlags("soak", "soak [flags]", `
Run a steady fleet for a while and count what its runtimes meet: N
credentials whose access tokens live --lifetime, kept fresh by refreshers for
--duration while each credential's runtime asks auth.token for its token
every --use-every and calls a protected resource server with it (which asks
the authorization server whether the token is valid, and answers 401 to an
expired or revoked one).

Everything runs on loopback: an embedded NATS server, the built-in
authorization server (rotating refresh tokens, reuse detection), the
resource server, the runtimes, and the refreshers.

Refreshers: by default --refreshers pools in this process. With --refresher
PATH each refresher is a process of that binary (build one with
"go build -o /tmp/refresher ./cmd/refresher"), joining the soak's NATS
server with --nats-url and --allow-loopback-token-hosts; then --kill-at
kills the first one with SIGKILL and starts it again at once, and the table
shows each refresher's own CPU and peak memory. Without --refresher a kill
closes a pool's NATS connection abruptly, and CPU and memory are the whole
process's.

--outage-at and --outage-for take the token endpoint down for a while (its
connections are closed unanswered); the counts are then split before,
during and after the outage.

Progress goes to stderr every 10s; the table (or --json) to stdout at the
end. Ctrl-C ends the soak early with the counts so far.`, s)
	var cfg soak.Config
	f.IntVar(&cfg.Credentials, "credentials", 1000, "N, the number of credentials")
	f.DurationVar(&cfg.Lifetime, "lifetime", time.Minute, "T, the lifetime of every access token (whole seconds, at least 4s)")
	f.DurationVar(&cfg.Duration, "duration", 2*time.Minute, "D, how long the runtimes use their tokens after registration")
	f.DurationVar(&cfg.UseEvery, "use-every", 0, "how often each credential's token is used (default lifetime/4)")
	f.IntVar(&cfg.MaxUses, "max-uses", 2000, "at most this many uses per second in all")
	f.IntVar(&cfg.Refreshers, "refreshers", 2, "how many refreshers run")
	f.IntVar(&cfg.Workers, "workers", 0, "concurrent refreshes per refresher (default: the refresher's, 4×GOMAXPROCS, at least 8)")
	f.DurationVar(&cfg.RefreshLead, "refresh-lead", 0, "passed to the refreshers (default: theirs, 10% of the lifetime, 30s–10m, at most half)")
	f.StringVar(&cfg.Refresher, "refresher", "", "path of a refresher binary: run each refresher as a process of it (needed for SIGKILL restarts and per-process usage)")
	f.bind("refresher", "AUTHBUS_SOAK_REFRESHER")
	refArgs := f.String("refresher-args", "", "more flags for each refresher process, space-separated, e.g. \"--reconcile-every 1m\"")
	f.DurationVar(&cfg.OutageAt, "outage-at", 0, "when the token endpoint goes down, after the start")
	f.DurationVar(&cfg.OutageFor, "outage-for", 0, "how long the token endpoint stays down (0: no outage)")
	f.DurationVar(&cfg.NATSSync, "nats-sync", 0, "how often the soak's NATS server syncs its store to disk (default: on every write, as the refresher's embedded server does; nats-server's own default is 2m)")
	kills := f.String("kill-at", "", "comma-separated times after the start when the first refresher is killed and started again, e.g. 3m,5m")
	logFile := f.String("log", "", "append the refreshers' warnings and errors to this file (default: discard them; the table counts them)")
	asJSON := f.Bool("json", false, "print the report as JSON instead of a table")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() != 0 {
		return usageErrorf("soak takes no arguments, got %q; run \"publisher soak --help\"", f.Args())
	}
	cfg.RefresherArgs = strings.Fields(*refArgs)
	if len(cfg.RefresherArgs) > 0 && cfg.Refresher == "" {
		return usageErrorf("--refresher-args needs --refresher: pools in this process take no flags")
	}
	for _, k := range strings.Split(*kills, ",") {
		if k = strings.TrimSpace(k); k == "" {
			continue
		}
		d, err := time.ParseDuration(k)
		if err != nil {
			return usageErrorf("--kill-at %q: %v; give durations such as 3m,5m30s", k, err)
		}
		cfg.KillAt = append(cfg.KillAt, d)
	}
	f.Visit(func(fl *flag.Flag) {
		if fl.Name == "nats-url" {
			fmt.Fprintln(s.errOut, "publisher soak: --nats-url is ignored: the soak runs its own NATS server")
		}
	})
	cfg.Prefix = f.g.prefix
	cfg.Progress = s.errOut
	if *logFile != "" {
		out, err := os.OpenFile(*logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("--log: %w", err)
		}
		defer out.Close()
		cfg.Log = out
	}
	rep, err := soak.Run(ctx, cfg)
	if err != nil {
		if errors.Is(err, soak.ErrInvalidConfig) {
			return usageErrorf("%w", err)
		}
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(s.out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return rep.WriteTable(s.out)
}
