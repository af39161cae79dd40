// Command probe is the container health check of the authbus images. They
// are distroless, with no shell, wget or curl, so compose.yaml runs this
// instead: it GETs each URL and exits 0 only if every one answers 2xx within
// the timeout.
//
//	probe [--timeout 3s] URL...
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 3*time.Second, "how long all URLs together may take")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: probe [--timeout 3s] URL...\n\nExits 0 when every URL answers a GET with 2xx, 1 otherwise.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "probe: no URL given; usage: probe [--timeout 3s] URL...")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	for _, u := range fs.Args() {
		if err := get(ctx, u); err != nil {
			fmt.Fprintf(stderr, "probe: %v\n", err)
			return 1
		}
	}
	return 0
}

func get(ctx context.Context, u string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("%s: %w; give an absolute http URL such as http://127.0.0.1:9464/readyz", u, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, body)
	}
	return nil
}
