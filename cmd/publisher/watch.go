package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	authclient "github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
)

func watch(ctx context.Context, args []string, s streams) error {
	f := newFlags("watch", "watch [flags] [PATTERN…]", `
Follow authbus events, one line each (or CloudEvents JSON with --json), until
interrupted. PATTERN is a key, a tenant (acme) or a key with NATS wildcards
(acme.*.github, acme.>); default all. Access tokens are never printed unless
--show-tokens is given; events carry no refresh tokens at all.

By default auth.rotated and auth.needs_reauth are followed (what a tenant's
user may subscribe to); --types 401,expiring adds the runtimes' reports.`, s)
	asJSON := f.Bool("json", false, "print each event as its CloudEvents JSON, one per line")
	showTokens := f.Bool("show-tokens", false, "print access tokens (hidden by default)")
	count := f.Int("count", 0, "exit after this many events (0: run until interrupted)")
	limit := f.Duration("for", 0, "exit with an error if --count events have not arrived within this time (0: no limit)")
	types := f.String("types", "rotated,needs_reauth", "event types to follow, comma-separated: 401, expiring, rotated, needs_reauth")
	if err := f.parse(args); err != nil {
		return err
	}
	var want []events.Type
	for _, w := range strings.Split(*types, ",") {
		t, ok := eventType(strings.TrimSpace(w))
		if !ok {
			return usageErrorf("--types: %q is not an event type; use 401, expiring, rotated or needs_reauth", w)
		}
		want = append(want, t)
	}
	patterns, err := keyPatterns(f.Args())
	if err != nil {
		return err
	}
	if *limit > 0 && *count == 0 {
		return usageErrorf("--for needs --count: say how many events to wait for")
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	w, err := authclient.Watch(c.nc, patterns, want, c.clientOptions()...)
	if err != nil {
		return err
	}
	defer w.Close()
	fmt.Fprintf(s.errOut, "watching %s\n", strings.Join(w.Subjects(), " "))

	if *limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *limit)
		defer cancel()
	}
	for seen := 0; *count == 0 || seen < *count; seen++ {
		ev, err := w.Next(ctx)
		switch {
		case ctx.Err() != nil:
			if *limit > 0 && ctx.Err() == context.DeadlineExceeded {
				return fmt.Errorf("saw %d of %d events within --for %v", seen, *count, *limit)
			}
			return nil
		case err != nil:
			fmt.Fprintf(s.errOut, "skipping a malformed %v\n", err)
		default:
			if err := printEvent(s, ev, *asJSON, *showTokens); err != nil {
				return err
			}
		}
	}
	return nil
}

func eventType(word string) (events.Type, bool) {
	for _, t := range []events.Type{events.Type401, events.TypeExpiring, events.TypeRotated, events.TypeNeedsReauth} {
		if word == t.Word() || word == string(t) {
			return t, true
		}
	}
	return "", false
}

// keyPatterns turns arguments into subject patterns over keys: a tenant
// becomes tenant.>, keys and wildcard patterns stay as they are. Each part
// is checked, so an argument cannot reach beyond the key tokens (a tenant
// user's permissions would refuse it anyway, but with a timeout).
func keyPatterns(args []string) ([]string, error) {
	if len(args) == 0 {
		return []string{">"}, nil
	}
	var out []string
	for _, a := range args {
		pat := a
		if !strings.Contains(a, ".") && a != "*" && a != ">" {
			pat += ".>" // a tenant
		}
		if authclient.CheckPattern(pat) != nil {
			return nil, usageErrorf("pattern %q: want a key tenant.user.server, a tenant, or a key with NATS wildcards such as acme.*.github or acme.>; each part [A-Za-z0-9_-]{1,64}", a)
		}
		out = append(out, pat)
	}
	return out, nil
}

// printEvent prints one event, without its access token unless showTokens.
func printEvent(s streams, ev *events.Event, asJSON, showTokens bool) error {
	var err error
	if ev.Rotated != nil && !showTokens {
		redacted := *ev.Rotated
		redacted.AccessToken = "[hidden]"
		if ev.Data, err = json.Marshal(redacted); err != nil {
			return err
		}
	}
	if asJSON {
		return writeJSON(s, ev.Envelope)
	}
	ts, key := ev.Time.UTC().Format(time.RFC3339), ev.Subject
	switch {
	case ev.Rotated != nil:
		exp := "never"
		if !ev.Rotated.ExpiresAt.IsZero() {
			exp = ev.Rotated.ExpiresAt.UTC().Format(time.RFC3339)
		}
		line := fmt.Sprintf("%s %s %s version=%d fingerprint=%s expires=%s", ts, ev.Type, key, ev.Rotated.Version, ev.Rotated.Fingerprint, exp)
		if showTokens {
			line += " access_token=" + ev.Rotated.AccessToken
		}
		_, err = fmt.Fprintln(s.out, line)
	case ev.NeedsReauth != nil:
		_, err = fmt.Fprintf(s.out, "%s %s %s version=%d reason=%s description=%q\n", ts, ev.Type, key, ev.NeedsReauth.Version, ev.NeedsReauth.Reason, ev.NeedsReauth.ErrorDescription)
	case ev.Unauthorized != nil:
		u := ev.Unauthorized
		_, err = fmt.Fprintf(s.out, "%s %s %s fingerprint=%s runtime=%q status=%d url=%q\n", ts, ev.Type, key, u.Fingerprint, u.Runtime, u.Status, u.URL)
	case ev.Expiring != nil:
		_, err = fmt.Fprintf(s.out, "%s %s %s fingerprint=%s expires=%s\n", ts, ev.Type, key, ev.Expiring.Fingerprint, ev.Expiring.ExpiresAt.UTC().Format(time.RFC3339))
	}
	return err
}
