package main

import (
	"context"
	"fmt"

	authclient "github.com/authbus/authbus/client"
)

func token(ctx context.Context, args []string, s streams) error {
	f := newFlags("token", "token [flags] KEY", `
Print the current access token of KEY and nothing else, for
  curl -H "Authorization: Bearer $(publisher token KEY)" …
The refresh token never leaves the refresher. Exits 3 when KEY is not
registered and 4 when it needs a new login.`, s)
	asJSON := f.Bool("json", false, "print the whole auth.token reply (access token, type, expiry, fingerprint, version) as JSON")
	if err := f.parse(args); err != nil {
		return err
	}
	key, err := f.oneKey()
	if err != nil {
		return err
	}
	c, err := f.connect()
	if err != nil {
		return err
	}
	defer c.close()
	reply, err := authclient.FetchToken(ctx, c.nc, key.String(), c.clientOptions()...)
	if err != nil {
		return explain(err)
	}
	if *asJSON {
		return writeJSON(s, reply)
	}
	_, err = fmt.Fprintln(s.out, reply.AccessToken)
	return err
}
