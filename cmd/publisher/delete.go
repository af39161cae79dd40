package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/workers"
)

const deleteAbout = `
Forget the credentials KEY…: purge the credential record (with its history of
sealed refresh tokens), the pending proactive refresh (<prefix>.proactive.KEY
in the schedules stream, and an earlier version's <prefix>.schedule.KEY in
the events stream) and the kept <prefix>.needs_reauth.KEY. The token
service answers not_found from then on; runtimes holding the access token
keep it until it expires. Registering the key again starts at version 1.

delete does not call the authorization server: the tokens stay valid there
until they expire. To end them there too, use revoke (RFC 7009).

delete is an operator command: it needs a NATS user with JetStream access to
the authbus streams and buckets, but no seal key and no running refresher.
Exits 3 if a KEY had nothing to forget (the others are still forgotten).`

// forgetResult is the --json output of delete, one per key.
type forgetResult struct {
	Key string `json:"key"`
	workers.Forgotten
}

func deleteCmd(ctx context.Context, args []string, s streams) error {
	f := newFlags("delete", "delete [flags] KEY…", deleteAbout, s)
	asJSON := f.Bool("json", false, "print one JSON object per key: what was found and removed")
	if err := f.parse(args); err != nil {
		return err
	}
	keys, err := f.keys()
	if err != nil {
		return err
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	js, err := jetstream.New(c.nc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.g.timeout)
	defer cancel()
	var missing []events.Key
	for _, k := range keys {
		done, err := workers.Forget(ctx, js, c.g.subj, k)
		if err != nil {
			return err
		}
		if !done.Registered {
			missing = append(missing, k)
		}
		if *asJSON {
			if err := writeJSON(s, forgetResult{Key: k.String(), Forgotten: done}); err != nil {
				return err
			}
			continue
		}
		printForgotten(s, k, done)
	}
	return notRegistered(missing)
}

// printForgotten says what Forget removed of k.
func printForgotten(s streams, k events.Key, done workers.Forgotten) {
	switch {
	case done.Registered:
		fmt.Fprintf(s.out, "forgot %s: removed %s\n", k, removed(done))
	case done.Any():
		fmt.Fprintf(s.out, "%s was not registered; removed %s\n", k, removed(done))
	default:
		fmt.Fprintf(s.out, "%s was not registered; nothing to forget\n", k)
	}
}

// notRegistered is the error for keys that had no credential record.
func notRegistered(missing []events.Key) error {
	if len(missing) == 0 {
		return nil
	}
	names := make([]string, len(missing))
	for i, k := range missing {
		names[i] = k.String()
	}
	return fmt.Errorf("%s: %w; nothing of it to forget (check the key and --prefix)", strings.Join(names, ", "), errNotRegistered)
}

// removed lists what Forget found, in words.
func removed(f workers.Forgotten) string {
	var items []string
	if f.Registered {
		items = append(items, "the record")
	}
	if f.Scheduled {
		items = append(items, "the pending refresh")
	}
	if f.NeedsReauth {
		items = append(items, "the kept needs_reauth")
	}
	if len(items) > 1 {
		return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
	}
	return strings.Join(items, "")
}
