package main

import (
	"bufio"
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/cmdtest"
)

// oneRun are the flags that may read no environment variable, and why:
// each describes one run of a command (its output, the data it reports,
// the size of a storm, what to print), not a setting of the machine or the
// deployment. An exported variable would change what a later command
// reports or does without anyone seeing it on the command line.
var oneRun = map[string]string{
	"json":           "output format of one run",
	"dry-run":        "what one run does",
	"expires-at":     "data of one token",
	"expires-in":     "data of one token",
	"token-type":     "data of one token",
	"fingerprint":    "data of one report",
	"status":         "data of one report",
	"url":            "data of one report",
	"wait":           "how long one run waits for its outcome",
	"show-tokens":    "printing access tokens must be asked for each time",
	"count":          "when one watch ends",
	"for":            "when one watch ends",
	"types":          "what one watch follows",
	"server-url":     "data of the files of one import",
	"reseal":         "what one key rotation does",
	"retire":         "what one key rotation does",
	"tenant":         "what permissions prints",
	"refresher":      "what permissions prints",
	"serving":        "what permissions prints",
	"user":           "what permissions prints (import's --user reads AUTHBUS_USER)",
	"password-env":   "what permissions prints",
	"mode":           "the size and shape of one storm",
	"credentials":    "the size and shape of one storm",
	"runtimes":       "the size and shape of one storm",
	"waves":          "the size and shape of one storm",
	"processes":      "the size and shape of one storm",
	"pools":          "the size and shape of one storm",
	"publishers":     "the size and shape of one storm",
	"probes":         "the size and shape of one storm",
	"wave-timeout":   "the size and shape of one storm",
	"latency":        "the size and shape of one storm",
	"fail":           "the size and shape of one storm",
	"cpuprofile":     "where one storm's profile goes",
	"token-url":      "the target of one storm (its secret reads AUTHBUS_STORM_CLIENT_SECRET)",
	"client-id":      "the target of one storm (register, login and devserver read AUTHBUS_CLIENT_ID)",
	"lifetime":       "the size and shape of one soak",
	"duration":       "the size and shape of one soak",
	"use-every":      "the size and shape of one soak",
	"max-uses":       "the size and shape of one soak",
	"refreshers":     "the size and shape of one soak",
	"refresher-args": "the size and shape of one soak",
	"outage-at":      "the faults of one soak",
	"outage-for":     "the faults of one soak",
	"kill-at":        "the faults of one soak",
	"nats-sync":      "the embedded server of one soak",
	"log":            "where one soak's refresher logs go",
}

// otherVariable are the flags whose name reads another variable in some
// command than elsewhere, and why.
var otherVariable = map[string]string{
	// The development server runs next to a refresher on the same machine:
	// AUTHBUS_LISTEN, exported for the refresher, must not move it.
	"devserver --listen": "AUTHBUS_DEVSERVER_LISTEN",
	// storm registers a thousand credentials with its own client.
	"storm --client-secret": "AUTHBUS_STORM_CLIENT_SECRET",
	// storm's --workers sizes its in-process pools, not a refresher's.
	"storm --workers": "",
	// storm's --reuse configures its built-in server like devserver's.
	"storm --reuse": "",
	// soak's --workers and --refresh-lead are passed to the refresher
	// processes it starts: one soak's shape, not this machine's refresher.
	"soak --workers":      "",
	"soak --refresh-lead": "",
	// The refresher's second NATS connection, the one that serves
	// runtimes: named like the connection's own NATS_USER and NATS_PASSWORD.
	"--nats-serve-user":     "NATS_SERVE_USER",
	"--nats-serve-password": "NATS_SERVE_PASSWORD",
}

// TestEveryCommandSpeaksOneGrammar runs --help of every command and
// subcommand of both binaries, as a person would, and checks what the
// README promises: help goes to stdout with exit status 0; every flag reads
// an environment variable unless it describes one run (oneRun); the NATS
// connection flags are the same in both binaries, each --nats-X reading the
// nats CLI's NATS_X; every other variable is AUTHBUS_*; and a flag name
// reads the same variable wherever it appears (but for otherVariable).
func TestEveryCommandSpeaksOneGrammar(t *testing.T) {
	bin := cmdtest.Binaries(t)
	refresher, publisher := filepath.Join(bin, "refresher"), filepath.Join(bin, "publisher")
	commands := [][]string{
		{refresher}, {refresher, "keys"}, {refresher, "permissions"},
		{refresher, "keys", "list"}, {refresher, "keys", "rotate"}, {refresher, "keys", "reseal"}, {refresher, "keys", "retire"},
		{publisher},
	}
	for _, name := range publisherCommands(t, help(t, publisher)) {
		commands = append(commands, []string{publisher, name})
	}
	connecting := 0
	seen := map[string]string{} // flag name → variable, where it reads one
	for _, cmd := range commands {
		name := filepath.Base(cmd[0]) + " " + strings.Join(cmd[1:], " ")
		flags := helpFlags(t, name, help(t, cmd...))
		if cmd[0] == publisher && len(cmd) == 1 {
			continue // the command list, with the common flags summed up
		}
		if len(flags) == 0 {
			t.Errorf("%s --help documents no flag", name)
		}
		conn := 0
		for _, f := range cli.ConnFlags {
			if env, ok := flags[f.Name]; ok {
				conn++
				if env != f.Env {
					t.Errorf("%s --%s reads %q; both binaries read %s", name, f.Name, env, f.Env)
				}
			}
		}
		switch {
		case conn == len(cli.ConnFlags):
			connecting++
		case conn > 0:
			t.Errorf("%s has %d of the %d NATS connection flags; a command that connects takes them all", name, conn, len(cli.ConnFlags))
		}
		for flag, env := range flags {
			key := strings.TrimSpace(strings.TrimPrefix(name, "publisher ")) + " --" + flag
			key = strings.TrimPrefix(key, "refresher ")
			if other, ok := otherVariable[key]; ok {
				if env != other {
					t.Errorf("%s --%s reads %q, want %q", name, flag, env, other)
				}
				continue
			}
			switch {
			case env == "":
				if _, ok := oneRun[flag]; !ok {
					t.Errorf("%s --%s reads no environment variable; bind one, or add it to oneRun saying why it may not", name, flag)
				}
				continue
			case strings.HasPrefix(flag, "nats-") && slices.ContainsFunc(cli.ConnFlags, func(f cli.ConnFlag) bool { return f.Name == flag }):
			case !strings.HasPrefix(env, "AUTHBUS_"):
				t.Errorf("%s --%s reads %s; settings other than the NATS connection read AUTHBUS_*", name, flag, env)
			}
			if prev, ok := seen[flag]; ok && prev != env {
				t.Errorf("--%s reads %s in %s but %s elsewhere: one flag, one variable", flag, env, name, prev)
			}
			seen[flag] = env
		}
	}
	// The daemon, keys and its four subcommands, every publisher command.
	if want := 6 + len(commands) - 8; connecting != want {
		t.Errorf("%d commands take the NATS connection flags, want %d (the daemon, keys and its four, every publisher command)", connecting, want)
	}
}

// help runs cmd with --help and returns its stdout; it must exit 0 and
// print nothing to stderr.
func help(t *testing.T, cmd ...string) string {
	t.Helper()
	c := exec.Command(cmd[0], append(cmd[1:], "--help")...)
	c.Env = cmdtest.CleanEnv()
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	name := filepath.Base(cmd[0]) + " " + strings.Join(cmd[1:], " ") + " --help"
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		t.Errorf("%s: exit status %d, want 0\nstderr:\n%s", name, exit.ExitCode(), stderr.String())
	case err != nil:
		t.Fatalf("%s: %v", name, err)
	}
	if stderr.Len() > 0 {
		t.Errorf("%s printed to stderr; help goes to stdout:\n%s", name, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "Usage: ") {
		t.Errorf("%s: stdout does not start with the usage line:\n%s", name, stdout.String())
	}
	return stdout.String()
}

var (
	flagLine = regexp.MustCompile(`^  --([a-z0-9][a-z0-9-]*)(?: (\S+))?$`)
	envNote  = regexp.MustCompile(`\(env ([A-Z][A-Z0-9_]*)\)`)
	cmdLine  = regexp.MustCompile(`^  ([a-z0-9]+) `)
)

// helpFlags returns the flags a help text documents, with the variable
// each reads ("" for none). Every flag is "  --name [TYPE]" on a line of its
// own, its description on the lines after it: the one style of both
// binaries.
func helpFlags(t *testing.T, name, text string) map[string]string {
	t.Helper()
	flags := map[string]string{}
	cur := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if m := flagLine.FindStringSubmatch(line); m != nil {
			if _, dup := flags[m[1]]; dup {
				t.Errorf("%s --help lists --%s twice", name, m[1])
			}
			cur = m[1]
			flags[cur] = ""
			continue
		}
		if strings.HasPrefix(line, "  -") && !strings.HasPrefix(line, "  --") {
			t.Errorf("%s --help writes a flag with one dash: %q", name, line)
		}
		if !strings.HasPrefix(line, "    \t") {
			cur = ""
			continue
		}
		if m := envNote.FindStringSubmatch(line); m != nil && cur != "" {
			flags[cur] = m[1]
		}
	}
	return flags
}

// publisherCommands returns the command names the publisher's help lists.
func publisherCommands(t *testing.T, text string) []string {
	t.Helper()
	_, list, ok := strings.Cut(text, "Commands:\n")
	if !ok {
		t.Fatalf("publisher --help lists no commands:\n%s", text)
	}
	list, _, _ = strings.Cut(list, "\n\n")
	var names []string
	for _, line := range strings.Split(list, "\n") {
		if m := cmdLine.FindStringSubmatch(line); m != nil {
			names = append(names, m[1])
		}
	}
	if len(names) < 10 {
		t.Fatalf("publisher --help lists %d commands: %q", len(names), names)
	}
	return names
}
