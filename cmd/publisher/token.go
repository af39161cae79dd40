package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/authbus/authbus/events"
)

func token(args []string, _ io.Reader, stdout, stderr io.Writer) error {
	var c conn
	var asJSON bool
	fs, env := newFlagSet("token", "token [flags] KEY", stderr, &c)
	fs.BoolVar(&asJSON, "json", false, "print the whole answer (token, type, expiry, version) as JSON")
	if err := c.parse(env, args); err != nil {
		return err
	}
	key, err := keyArg(fs)
	if err != nil {
		return err
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	var reply events.Rotated
	if err := c.request(context.Background(), nc, c.subj.Token(key), nil, &reply); err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(stdout).Encode(reply)
	}
	_, err = fmt.Fprintln(stdout, reply.AccessToken)
	return err
}
