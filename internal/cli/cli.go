// Package cli holds what the two authbus commands (refresher and
// publisher) share: flags with environment fallbacks, the NATS connection
// grammar (Conn), and --help in one style (Usage).
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
	fs      *flag.FlagSet
	envs    map[string]binding  // by flag name
	fromEnv map[string]envValue // flags set by a variable, by name
}

// envValue is what a variable set a flag to.
type envValue struct{ env, value string }

type binding struct {
	env   string
	empty bool // a variable set to "" sets the flag to ""
}

// NewEnvFlags returns an EnvFlags for fs.
func NewEnvFlags(fs *flag.FlagSet) *EnvFlags {
	return &EnvFlags{fs: fs, envs: map[string]binding{}, fromEnv: map[string]envValue{}}
}

// FlagSet returns the flag set e binds.
func (e *EnvFlags) FlagSet() *flag.FlagSet { return e.fs }

// Origin says where the value of flag name came from after Parse, in the
// words of an error message: "--listen" when given on the command line,
// "AUTHBUS_LISTEN" when read from the environment, "" when it has its
// default.
func (e *EnvFlags) Origin(name string) string {
	origin := ""
	e.fs.Visit(func(f *flag.Flag) {
		if f.Name != name {
			return
		}
		origin = "--" + name
		// A flag on the command line is set after the variable; it wins
		// when it changed the value.
		if v, ok := e.fromEnv[name]; ok && f.Value.String() == v.value {
			origin = v.env
		}
	})
	return origin
}

// Bind ties the already defined flag name to the environment variable env.
// A variable set to the empty string counts as unset, as compose files and
// shells pass unset variables along as empty ones.
func (e *EnvFlags) Bind(name, env string) { e.bind(name, binding{env: env}) }

// BindEmpty is Bind for a flag whose empty value means something ("off"):
// a variable set to the empty string sets the flag to "".
func (e *EnvFlags) BindEmpty(name, env string) { e.bind(name, binding{env: env, empty: true}) }

func (e *EnvFlags) bind(name string, b binding) {
	f := e.fs.Lookup(name)
	if f == nil {
		panic("cli: Bind of undefined flag " + name)
	}
	f.Usage += " (env " + b.env + ")"
	e.envs[name] = b
}

// Parse applies the environment, then parses args. A malformed variable is
// an error naming it.
func (e *EnvFlags) Parse(args []string) error {
	for name, b := range e.envs {
		v, ok := os.LookupEnv(b.env)
		if !ok || (v == "" && !b.empty) {
			continue
		}
		if err := e.fs.Set(name, v); err != nil {
			return fmt.Errorf("environment %s=%q: %w", b.env, v, err)
		}
		e.fromEnv[name] = envValue{env: b.env, value: e.fs.Lookup(name).Value.String()}
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
