package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
)

func unauthorized(args []string, _ io.Reader, stdout, stderr io.Writer) error {
	var c conn
	var ev events.Unauthorized
	var accessToken string
	fs, env := newFlagSet("401", "401 [flags] KEY", stderr, &c)
	fs.StringVar(&ev.Fingerprint, "fingerprint", "", "fingerprint of the token that got 401 (16 hex characters)")
	fs.StringVar(&accessToken, "access-token", "", "the token that got 401; only its fingerprint is sent")
	env.Bind("access-token", "AUTHBUS_ACCESS_TOKEN")
	host, _ := os.Hostname()
	fs.StringVar(&ev.Runtime, "runtime", "publisher@"+host, "who saw the 401")
	fs.IntVar(&ev.Status, "status", 401, "HTTP status seen")
	fs.StringVar(&ev.URL, "url", "", "URL of the request that got 401")
	if err := c.parse(env, args); err != nil {
		return err
	}
	key, err := keyArg(fs)
	if err != nil {
		return err
	}
	switch {
	case ev.Fingerprint == "" && accessToken == "":
		return fmt.Errorf("say which token got 401: --fingerprint FP or --access-token TOKEN")
	case ev.Fingerprint == "":
		ev.Fingerprint = events.Fingerprint(accessToken)
	}
	ev.ObservedAt = time.Now().UTC()
	host, _ = os.Hostname()
	data, err := events.Encode(key, "authbus/publisher/"+host, ev)
	if err != nil {
		return err
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	msg := nats.NewMsg(c.subj.Event(events.Type401, key))
	msg.Data = data
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	ack, err := js.PublishMsg(ctx, msg, jetstream.WithMsgID(events.MsgID(events.Type401, key, ev.Fingerprint)))
	if err != nil {
		return fmt.Errorf("publish %s: %w; is the refresher running (it creates the stream)?", msg.Subject, err)
	}
	if ack.Duplicate {
		fmt.Fprintf(stdout, "published %s: duplicate of a 401 for the same token in the de-duplication window (already being handled)\n", msg.Subject)
		return nil
	}
	fmt.Fprintf(stdout, "published %s: stream %s sequence %d\n", msg.Subject, ack.Stream, ack.Sequence)
	return nil
}
