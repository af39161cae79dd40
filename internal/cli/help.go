package cli

import (
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Usage is the --help text of one command. Both binaries print every
// command's help through it, to stdout, so that all of them read alike:
// the synopsis, what the command does, its own flags, then the flag groups
// (the NATS connection flags last), each flag with its value type, what it
// does, its environment variable and its default.
type Usage struct {
	Synopsis string  // "publisher token [flags] KEY"
	About    string  // what the command does; leading and trailing space is trimmed
	Groups   []Group // titled flag groups; flags in none are listed first, under "Flags"
	Footer   string  // a last paragraph, if any
}

// Group is a titled set of flags in a help text.
type Group struct {
	Title string
	Names []string
}

// ConnGroup is the group of Conn's flags.
func ConnGroup() Group {
	g := Group{Title: "NATS connection flags"}
	for _, f := range ConnFlags {
		g.Names = append(g.Names, f.Name)
	}
	return g
}

// envNote ends every help text: the rule the flags follow.
const envNote = "Each flag that shows a variable reads it when the flag is not given."

// Print writes the help of the command whose flags are fs to w.
func (u Usage) Print(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: %s\n", u.Synopsis)
	if about := strings.TrimSpace(u.About); about != "" {
		fmt.Fprintf(w, "\n%s\n", about)
	}
	grouped := map[string]bool{}
	for _, g := range u.Groups {
		for _, n := range g.Names {
			grouped[n] = true
		}
	}
	var own []*flag.Flag
	fs.VisitAll(func(f *flag.Flag) {
		if !grouped[f.Name] {
			own = append(own, f)
		}
	})
	if len(own) > 0 {
		fmt.Fprintln(w, "\nFlags:")
		printFlags(w, own)
	}
	for _, g := range u.Groups {
		var flags []*flag.Flag
		for _, n := range g.Names {
			if f := fs.Lookup(n); f != nil {
				flags = append(flags, f)
			}
		}
		if len(flags) > 0 {
			fmt.Fprintf(w, "\n%s:\n", g.Title)
			printFlags(w, flags)
		}
	}
	footer := strings.TrimSpace(u.Footer)
	if hasFlags := len(own) > 0 || len(u.Groups) > 0; hasFlags {
		footer = strings.TrimSpace(footer + "\n" + envNote)
	}
	if footer != "" {
		fmt.Fprintf(w, "\n%s\n", footer)
	}
}

// printFlags prints flags as "  --name TYPE" and the usage on the next
// line, as flag.PrintDefaults does but with two dashes, the way the
// commands are written in the docs.
func printFlags(w io.Writer, flags []*flag.Flag) {
	for _, fl := range flags {
		typ, use := flag.UnquoteUsage(fl)
		line := "  --" + fl.Name
		if typ != "" {
			line += " " + typ
		}
		line += "\n    \t" + strings.ReplaceAll(use, "\n", "\n    \t")
		if !slices.Contains([]string{"", "false", "0", "0s", "[]"}, fl.DefValue) {
			line += fmt.Sprintf(" (default %s)", fl.DefValue)
		}
		fmt.Fprintln(w, line)
	}
}
