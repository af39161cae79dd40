package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime/pprof"
	"slices"

	"github.com/authbus/authbus/internal/authserver"
	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/storm"
)

func stormCmd(ctx context.Context, args []string, s streams) error {
	f := newFlags("storm", "storm [flags]", `
Run a 401 storm: K credentials, N runtimes per credential all reporting a 401
at once, in waves, and count what it costs at the token endpoint, side by
side for each --mode:

  naive      every runtime refreshes for itself with x/oauth2
  inprocess  a singleflight per process, --processes processes
  authbus    runtimes publish auth.401, refresher pools refresh
  ceiling    the bare NATS operations of a refresh plus the same token call,
             no authbus code, same concurrency (always run with authbus)

By default everything runs in this process: an embedded NATS server,
refresher pools, and a test authorization server with refresh-token
rotation and reuse detection. --nats-url joins a deployment instead, whose
refreshers do the authbus refreshes (they must reach the token endpoint,
and allow loopback hosts for the built-in one); NATS_URL alone is refused,
so that a variable exported for the other commands never sends a storm to
a deployment.
--token-url uses a real token endpoint with the client_credentials grant.

Progress goes to stderr; the table (or --json) to stdout.`, s)
	var cfg storm.Config
	// The defaults are storm.Config's zero values, said in the usage.
	mode := f.String("mode", "", "comma-separated modes to run side by side: naive, inprocess, authbus, ceiling (default all four)")
	f.IntVar(&cfg.Credentials, "credentials", 0, "K, the number of credentials (default 500)")
	f.IntVar(&cfg.Runtimes, "runtimes", 0, "N, the runtimes per credential that each see the 401 (default 8)")
	f.IntVar(&cfg.Waves, "waves", 0, "how often every credential's token is rejected, one wave after the other (default 3)")
	f.IntVar(&cfg.Processes, "processes", 0, "P, the processes of the inprocess mode (default 4)")
	f.IntVar(&cfg.Pools, "pools", 0, "in-process refresher pools, and ceiling worker groups (default 2)")
	f.IntVar(&cfg.Workers, "workers", 0, "concurrent refreshes per pool and per ceiling group (default: the refresher's, 4×GOMAXPROCS, at least 8)")
	f.IntVar(&cfg.Publishers, "publishers", 0, "goroutines publishing 401s, and naive runtimes calling at once (default 16)")
	f.IntVar(&cfg.Probes, "probes", 0, "one-at-a-time refreshes after the waves, to measure the latency authbus adds (default 200; negative: none); with fewer than 100 their p99 is the largest")
	f.DurationVar(&cfg.WaveTimeout, "wave-timeout", 0, "give up on a wave after this long (default 2m)")
	f.DurationVar(&cfg.Latency, "latency", 0, "the built-in authorization server's answer time")
	f.IntVar(&cfg.Failures, "fail", 0, "the built-in server answers the first N token calls of every wave with 503")
	reuse := f.String("reuse", "invalid_grant", "the built-in server's answer to a spent refresh token: "+authserver.ReuseModeNames)
	f.StringVar(&cfg.TokenURL, "token-url", "", "a real token endpoint instead of the built-in server (client_credentials grant)")
	f.StringVar(&cfg.ClientID, "client-id", "", "client id at --token-url")
	f.StringVar(&cfg.ClientSecret, "client-secret", "", "client secret at --token-url")
	f.bind("client-secret", "AUTHBUS_STORM_CLIENT_SECRET")
	asJSON := f.Bool("json", false, "print the results as JSON instead of a table")
	cpuProfile := f.String("cpuprofile", "", "write a CPU profile of the whole storm to this file (go tool pprof FILE)")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() != 0 {
		return usageErrorf("storm takes no arguments, got %q; run \"publisher storm --help\"", f.Args())
	}
	var err error
	if *mode != "" {
		modes, err := storm.ParseModes(*mode)
		if err != nil {
			return usageErrorf("--mode: %w", err)
		}
		if slices.Contains(modes, storm.ModeAuthbus) && !slices.Contains(modes, storm.ModeCeiling) {
			// authbus is always reported against its ceiling.
			modes = append(modes, storm.ModeCeiling)
		}
		cfg.Modes = modes
	}
	if cfg.Reuse, err = authserver.ParseReuseMode(*reuse); err != nil {
		return usageErrorf("--reuse: %w", err)
	}
	// The default is everything in this process. A deployment is joined
	// only when the command line says so: a NATS_URL exported for the
	// other commands must not send a storm of 401s to its refreshers.
	switch origin := f.env.Origin("nats-url"); origin {
	case "--nats-url":
		cfg.NATSURL = f.g.conn.URL
		if cfg.NATSOptions, err = f.g.conn.Options(); err != nil {
			return err
		}
	case "":
		for _, c := range cli.ConnFlags[1:] {
			if from := f.env.Origin(c.Name); from != "" {
				return usageErrorf("%s applies to a deployment's NATS, but storm runs its own embedded server without --nats-url: give --nats-url to storm a deployment, or drop %s", from, from)
			}
		}
	default:
		return usageErrorf("%s is set (%s), but storm joins a deployment only when --nats-url is given on the command line: its refreshers would take K×N 401s. Pass --nats-url to storm that deployment, or unset %s to run everything in this process",
			origin, cli.RedactURLs(f.g.conn.URL), origin)
	}
	cfg.Prefix = f.g.prefix
	cfg.Progress = s.errOut

	if *cpuProfile != "" {
		out, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer out.Close()
		if err := pprof.StartCPUProfile(out); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	rep, err := storm.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(s.out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return rep.WriteTable(s.out)
}
