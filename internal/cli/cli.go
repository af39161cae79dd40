// Package cli holds what the authbus commands share: flags with environment
// fallbacks and the NATS connection options.
package cli

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// EnvFlags binds flags of a FlagSet to environment variables: a variable
// that is set replaces the flag's default, and an explicit flag wins over
// both. Bound flags say their variable in --help.
type EnvFlags struct {
	fs   *flag.FlagSet
	envs map[string]string // flag name → variable
}

// NewEnvFlags returns an EnvFlags for fs.
func NewEnvFlags(fs *flag.FlagSet) *EnvFlags {
	return &EnvFlags{fs: fs, envs: map[string]string{}}
}

// Bind ties the already defined flag name to the environment variable env.
func (e *EnvFlags) Bind(name, env string) {
	f := e.fs.Lookup(name)
	if f == nil {
		panic("cli: Bind of undefined flag " + name)
	}
	f.Usage += " (env " + env + ")"
	e.envs[name] = env
}

// Parse applies the environment, then parses args. A malformed variable is
// an error naming it.
func (e *EnvFlags) Parse(args []string) error {
	for name, env := range e.envs {
		if v, ok := os.LookupEnv(env); ok && v != "" {
			if err := e.fs.Set(name, v); err != nil {
				return fmt.Errorf("environment %s=%q: %w", env, v, err)
			}
		}
	}
	return e.fs.Parse(args)
}

// StringList is a repeatable string flag; comma-separated values are split.
type StringList []string

// String implements flag.Value.
func (l *StringList) String() string { return strings.Join(*l, ",") }

// Set implements flag.Value.
func (l *StringList) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}
