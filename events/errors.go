package events

import (
	"fmt"
	"io"
	"strconv"
)

// maxQuoted bounds how much of an offending value an error message repeats:
// errors become log lines and termination reasons, and the input may be
// 64 KiB of garbage.
const maxQuoted = 80

// quote quotes s for an error message, shortened to maxQuoted bytes.
func quote(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:maxQuoted]) + "…"
}

// multiErr is an error with its own message that wraps several errors, so
// that errors.Is finds each sentinel without the message repeating them.
type multiErr struct {
	msg  string
	errs []error
}

func (e *multiErr) Error() string   { return e.msg }
func (e *multiErr) Unwrap() []error { return e.errs }

// also returns err, unchanged in text, that additionally wraps sentinel.
func also(err, sentinel error) error {
	return &multiErr{msg: err.Error(), errs: []error{err, sentinel}}
}

// formatRedacted implements fmt.Formatter for types that hold secrets: every
// verb prints the redacted String form (%#v the GoString form), so that no
// verb, not even %x or %d, reaches the secret fields through reflection.
func formatRedacted(f fmt.State, verb rune, s, gs string) {
	switch {
	case verb == 'v' && f.Flag('#'):
		io.WriteString(f, gs)
	case verb == 'q':
		io.WriteString(f, strconv.Quote(s))
	default:
		io.WriteString(f, s)
	}
}
