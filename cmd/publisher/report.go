package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	authclient "github.com/authbus/authbus/client"
	"github.com/authbus/authbus/events"
)

// reportFlags are what 401 and expiring share: which token the report is
// about, and whether to wait for the outcome.
type reportFlags struct {
	fingerprint, accessToken string
	asJSON                   bool
	wait, recheck            time.Duration
}

func (r *reportFlags) define(f *cmdFlags, what string) {
	f.StringVar(&r.fingerprint, "fingerprint", "", "fingerprint of the token that "+what+" (16 hex characters)")
	f.StringVar(&r.accessToken, "access-token", "", "the token that "+what+"; only its fingerprint is sent")
	f.bind("access-token", "AUTHBUS_ACCESS_TOKEN")
	f.BoolVar(&r.asJSON, "json", false, "print the publish result (and with --wait, the outcome) as JSON")
	f.DurationVar(&r.wait, "wait", 0, "wait this long for the outcome: exit 0 once a token other than the reported one is in force, 4 on needs_reauth (0: do not wait)")
	f.DurationVar(&r.recheck, "recheck", authclient.DefaultRecheckInterval, "with --wait: ask auth.token again after this long without an answer, then at doubling gaps up to 4 times it")
	f.bind("recheck", "AUTHBUS_RECHECK")
}

// check refuses contradictory or malformed token flags before anything
// is sent.
func (r *reportFlags) check(f *cmdFlags) error {
	switch {
	case r.fingerprint != "" && r.accessToken != "":
		return usageErrorf("give --fingerprint or --access-token, not both")
	case r.fingerprint != "" && !events.ValidFingerprint(r.fingerprint):
		return usageErrorf("--fingerprint: want 16 lowercase hex characters, the fingerprint of the token, never the token itself (use --access-token for that)")
	case r.wait < 0:
		return usageErrorf("--wait %v: give a positive duration such as 30s, or 0 not to wait", r.wait)
	case r.recheck <= 0:
		return usageErrorf("--recheck %v: give a positive duration such as 2s", r.recheck)
	case r.wait == 0 && f.env.Origin("recheck") == "--recheck":
		return usageErrorf("--recheck paces the waiting of --wait, which is not given: add --wait, or drop --recheck")
	}
	return nil
}

// tokenFingerprint resolves which token the report is about: --fingerprint,
// else the fingerprint of --access-token, else the current token (asked of
// the token service), which is also returned.
func (r *reportFlags) tokenFingerprint(ctx context.Context, src *authclient.Source) (string, *events.Rotated, error) {
	switch {
	case r.fingerprint != "":
		return r.fingerprint, nil, nil
	case r.accessToken != "":
		return events.Fingerprint(r.accessToken), nil, nil
	}
	cur, err := src.Current(ctx)
	if err != nil {
		return "", nil, fmt.Errorf("no --fingerprint or --access-token given, and the current token could not be read: %w", explain(err))
	}
	return cur.Fingerprint, &cur, nil
}

func unauthorized(ctx context.Context, args []string, s streams) error {
	f := newFlags("401", "401 [flags] KEY", `
Report that a request with the token of KEY got HTTP 401, through JetStream
with the Nats-Msg-Id that collapses a storm of 401s for one token into one
refresh. The token is named by --fingerprint or --access-token (only its
fingerprint is sent); with neither, the current token is meant, which makes
the refreshers refresh it now.`, s)
	var r reportFlags
	r.define(f, "got 401")
	host, _ := os.Hostname()
	runtime := f.String("runtime", "publisher@"+host, "who saw the 401")
	f.bind("runtime", "AUTHBUS_RUNTIME")
	status := f.Int("status", 401, "HTTP status seen")
	rawURL := f.String("url", "", "URL of the request that got 401 (its query and credentials are dropped)")
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	u, err := cleanURL(*rawURL)
	if err != nil {
		return err
	}
	return report(ctx, f, key, &r, *runtime, func(src *authclient.Source, fp string, _ *events.Rotated) (authclient.Published, error) {
		return src.Report401(ctx, authclient.Refusal{Fingerprint: fp, Status: *status, URL: u})
	})
}

func expiring(ctx context.Context, args []string, s streams) error {
	f := newFlags("expiring", "expiring [flags] KEY", `
Report that the token of KEY expires soon. The refreshers refresh it only
when it is due (within the refresh lead of its expiry), otherwise they
acknowledge it as not due. The token is named by --fingerprint or
--access-token; with neither, the current token and its expiry are used.
A report that is not due is acknowledged silently, so --wait then times out.`, s)
	var r reportFlags
	r.define(f, "expires")
	expiresAt := f.String("expires-at", "", "when the token expires, RFC 3339 (default: the current token's expiry)")
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	var at time.Time
	if *expiresAt != "" {
		if at, err = time.Parse(time.RFC3339, *expiresAt); err != nil {
			return usageErrorf("--expires-at %q: not RFC 3339; write it like 2026-11-23T20:00:00Z", *expiresAt)
		}
	}
	if at.IsZero() && (r.fingerprint != "" || r.accessToken != "") {
		return usageErrorf("say when that token expires with --expires-at (RFC 3339)")
	}
	host, _ := os.Hostname()
	return report(ctx, f, key, &r, "publisher@"+host, func(src *authclient.Source, fp string, cur *events.Rotated) (authclient.Published, error) {
		if at.IsZero() && cur != nil {
			at = cur.ExpiresAt
		}
		if at.IsZero() {
			return authclient.Published{}, usageErrorf("the current token has no expiry; say when it expires with --expires-at (RFC 3339)")
		}
		return src.ReportExpiring(ctx, fp, at)
	})
}

// publishResult is the --json output of 401 and expiring.
type publishResult struct {
	Subject     string `json:"subject"`
	MsgID       string `json:"msg_id"`
	Fingerprint string `json:"fingerprint"`
	Stream      string `json:"stream"`
	Sequence    uint64 `json:"sequence"`
	// Duplicate: the stream already had this report in its duplicate
	// window; the refreshers are handling that one.
	Duplicate bool     `json:"duplicate"`
	Outcome   *outcome `json:"outcome,omitempty"`
}

// outcome is what --wait saw: the rotation or the needs_reauth that
// answered the report. It never holds the access token.
type outcome struct {
	Type        events.Type `json:"type"`
	Version     int64       `json:"version"`
	Fingerprint string      `json:"fingerprint,omitempty"`
	ExpiresAt   time.Time   `json:"expires_at,omitzero"`
	Reason      string      `json:"reason,omitempty"`
	Description string      `json:"error_description,omitempty"`
}

// report publishes what send sends for key, as the runtime runtime, and
// with --wait waits for the token that replaces the reported one (the
// protocol's recipe: the Source subscribes first, and asks auth.token at
// once after the report).
func report(ctx context.Context, f *cmdFlags, key events.Key, r *reportFlags, runtime string,
	send func(src *authclient.Source, fp string, cur *events.Rotated) (authclient.Published, error)) error {
	if err := r.check(f); err != nil {
		return err
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	opts := append(c.clientOptions(), authclient.WithRuntime(runtime), authclient.WithRecheckInterval(r.recheck))
	if r.wait > 0 {
		opts = append(opts, authclient.WithWaitTimeout(r.wait))
	}
	src, err := authclient.New(c.nc, key.String(), opts...)
	if err != nil {
		return explain(err)
	}
	defer src.Close()
	fp, cur, err := r.tokenFingerprint(ctx, src)
	if err != nil {
		return err
	}
	pub, err := send(src, fp, cur)
	if errors.Is(err, events.ErrInvalidEvent) {
		return usageErrorf("%w", err)
	}
	if err != nil {
		return explain(err)
	}
	res := publishResult{Subject: pub.Subject, MsgID: pub.MsgID, Fingerprint: fp,
		Stream: pub.Stream, Sequence: pub.Sequence, Duplicate: pub.Duplicate}
	if !r.asJSON {
		if pub.Duplicate {
			fmt.Fprintf(f.s.out, "published %s: duplicate of a report for the same token in the de-duplication window (already being handled)\n", pub.Subject)
		} else {
			fmt.Fprintf(f.s.out, "published %s: stream %s sequence %d\n", pub.Subject, pub.Stream, pub.Sequence)
		}
	}
	if r.wait > 0 {
		res.Outcome, err = awaitOutcome(ctx, src, key, fp, r.wait)
		if err != nil {
			return err
		}
		if !r.asJSON {
			printOutcome(f.s, res.Outcome)
		}
	}
	if r.asJSON {
		if jerr := writeJSON(f.s, res); jerr != nil {
			return jerr
		}
	}
	if res.Outcome != nil && res.Outcome.Type == events.TypeNeedsReauth {
		return fmt.Errorf("%s: %w (%s); log in again and register the new tokens", key, errReauth, res.Outcome.Reason)
	}
	return nil
}

// awaitOutcome waits for the token that replaces fp, or for the news that
// the credential needs a new login. A re-announcement of fp itself (an
// expiring that was not due) does not end the wait.
func awaitOutcome(ctx context.Context, src *authclient.Source, key events.Key, fp string, d time.Duration) (*outcome, error) {
	tok, err := src.Replacement(ctx, fp)
	var nre *authclient.NeedsReauthError
	switch {
	case errors.As(err, &nre):
		return &outcome{Type: events.TypeNeedsReauth, Version: nre.Version, Reason: nre.Reason, Description: nre.Description}, nil
	case errors.Is(err, authclient.ErrTimeout):
		return nil, fmt.Errorf("no new token or needs_reauth for %s within --wait %v: the refresh may still be running or retrying (see publisher watch, publisher status)", key, d)
	case err != nil:
		return nil, explain(err)
	}
	return &outcome{Type: events.TypeRotated, Version: tok.Version, Fingerprint: tok.Fingerprint, ExpiresAt: tok.ExpiresAt}, nil
}

func printOutcome(s streams, o *outcome) {
	if o.Type == events.TypeNeedsReauth {
		fmt.Fprintf(s.out, "needs_reauth: version %d, reason %s: %s\n", o.Version, o.Reason, o.Description)
		return
	}
	exp := "never"
	if !o.ExpiresAt.IsZero() {
		exp = o.ExpiresAt.UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(s.out, "rotated: version %d, fingerprint %s, expires %s\n", o.Version, o.Fingerprint, exp)
}

// cleanURL drops what may hold secrets from a reported URL (user info,
// query, fragment) and keeps it within the protocol's limit.
func cleanURL(raw string) (string, error) {
	if raw == "" {
		return "", nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		// Not repeated: the URL may hold secrets.
		return "", usageErrorf("--url: cannot be parsed as a URL; give the URL of the request that got 401, or leave it out")
	}
	u.User, u.RawQuery, u.ForceQuery, u.Fragment, u.RawFragment = nil, "", false, "", ""
	s := u.String()
	if len(s) > events.MaxURLLen {
		s = s[:events.MaxURLLen]
	}
	return s, nil
}
