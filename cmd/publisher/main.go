// Command publisher is the operator's and runtime's CLI for authbus: register
// a credential, report a 401, read the current token, and watch events.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

const usage = `Usage: publisher <command> [flags] [args]

Commands:
  register KEY   store fresh tokens for a credential (and how to refresh them)
  401 KEY        report that a request with a token got HTTP 401
  token KEY      print the current access token (for curl -H "Authorization: Bearer $(publisher token KEY)")
  watch [KEYS]   follow auth.rotated and auth.needs_reauth events

KEY is tenant.user.server, each part [A-Za-z0-9_-]{1,64}.
Run "publisher <command> --help" for the flags of a command.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// command is one subcommand: it parses its own flags.
type command func(args []string, stdin io.Reader, stdout, stderr io.Writer) error

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmds := map[string]command{
		"register": register,
		"401":      unauthorized,
		"token":    token,
		"watch":    watch,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "publisher: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err := cmd(args[1:], stdin, stdout, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "publisher %s: %v\n", args[0], err)
		return 1
	}
	return 0
}
