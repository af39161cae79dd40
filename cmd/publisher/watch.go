package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/events"
)

func watch(args []string, _ io.Reader, stdout, stderr io.Writer) error {
	var c conn
	var asJSON, showTokens bool
	var count int
	var duration time.Duration
	fs, env := newFlagSet("watch", "watch [flags] [KEY-PATTERN…]\n\nKEY-PATTERN is a key or a NATS wildcard over keys (acme.>, acme.*.github); default all", stderr, &c)
	fs.BoolVar(&asJSON, "json", false, "print each event as its CloudEvents JSON, one per line")
	fs.BoolVar(&showTokens, "show-tokens", false, "include access tokens in --json output (they are redacted by default)")
	fs.IntVar(&count, "count", 0, "exit after this many events (0: run until interrupted)")
	fs.DurationVar(&duration, "for", 0, "exit with an error if --count events have not arrived within this time (0: no limit)")
	if err := c.parse(env, args); err != nil {
		return err
	}
	patterns := fs.Args()
	if len(patterns) == 0 {
		patterns = []string{">"}
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	ch := make(chan *nats.Msg, 256)
	var subjects []string
	for _, pat := range patterns {
		for _, t := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
			subject := c.subj.Prefix() + "." + t.Word() + "." + pat
			if _, err := nc.ChanSubscribe(subject, ch); err != nil {
				return fmt.Errorf("subscribe %s: %w; patterns are keys or NATS wildcards such as acme.>", subject, err)
			}
			subjects = append(subjects, subject)
		}
	}
	if err := nc.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "watching %v\n", subjects)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	for seen := 0; count == 0 || seen < count; seen++ {
		select {
		case <-ctx.Done():
			if duration > 0 && count > 0 && ctx.Err() == context.DeadlineExceeded {
				return fmt.Errorf("saw %d of %d events within %v", seen, count, duration)
			}
			return nil
		case msg := <-ch:
			if err := printEvent(stdout, c.subj, msg, asJSON, showTokens); err != nil {
				fmt.Fprintf(stderr, "skipping a malformed event on %s: %v\n", msg.Subject, err)
			}
		}
	}
	return nil
}

func printEvent(w io.Writer, subj events.Subjects, msg *nats.Msg, asJSON, showTokens bool) error {
	typ, key, err := subj.ParseEvent(msg.Subject)
	if err != nil {
		return err
	}
	ev, err := events.Decode(typ, key, msg.Data)
	if err != nil {
		return err
	}
	if asJSON {
		if ev.Rotated != nil && !showTokens {
			redacted := *ev.Rotated
			redacted.AccessToken = "[redacted]"
			if ev.Data, err = json.Marshal(redacted); err != nil {
				return err
			}
		}
		return json.NewEncoder(w).Encode(ev.Envelope)
	}
	ts := ev.Time.UTC().Format(time.RFC3339)
	switch {
	case ev.Rotated != nil:
		exp := "never"
		if !ev.Rotated.ExpiresAt.IsZero() {
			exp = ev.Rotated.ExpiresAt.UTC().Format(time.RFC3339)
		}
		_, err = fmt.Fprintf(w, "%s %s %s version=%d fingerprint=%s expires=%s\n", ts, ev.Type, key, ev.Rotated.Version, ev.Rotated.Fingerprint, exp)
	case ev.NeedsReauth != nil:
		_, err = fmt.Fprintf(w, "%s %s %s version=%d reason=%s description=%q\n", ts, ev.Type, key, ev.NeedsReauth.Version, ev.NeedsReauth.Reason, ev.NeedsReauth.ErrorDescription)
	}
	return err
}
