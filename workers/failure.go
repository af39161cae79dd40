package workers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/authbus/authbus/kv"
)

// maxCauseLen bounds the cause of a failed refresh: it goes into a log
// line and the credential record, and a hostile server chooses part of it.
const maxCauseLen = 300

// failureCause words for a person why a token-endpoint call failed: the
// HTTP status with the server's OAuth error, or the error that kept the
// call from being answered (a host name that does not resolve, a refused
// connection, a timeout). It leaves out the request URL, whose query may
// carry a secret, and it is scrubbed of the credential's tokens: the text
// reaches the log and the credential record, where status shows it.
func failureCause(err error, a answer, c *kv.Credential, timeout time.Duration) string {
	var b strings.Builder
	var ue *url.Error
	var ne net.Error
	switch {
	case a.status != 0:
		fmt.Fprintf(&b, "token endpoint answered HTTP %d", a.status)
		if a.reason != "" {
			b.WriteString(" " + a.reason)
		}
		if a.description != "" {
			fmt.Fprintf(&b, " %q", a.description)
		}
		if a.retryAfter > 0 {
			fmt.Fprintf(&b, " (Retry-After %v)", a.retryAfter)
		}
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		fmt.Fprintf(&b, "token endpoint did not answer within %v (--token-timeout)", timeout)
	case errors.As(err, &ue):
		// url.Error says "Post \"<URL>\": <cause>"; the cause is what
		// matters, and the URL may carry a secret in its query.
		b.WriteString("token endpoint unreachable: " + ue.Err.Error())
	case err != nil:
		b.WriteString("token endpoint call failed: " + err.Error())
	default:
		b.WriteString("token endpoint call failed")
	}
	return truncate(scrub(b.String(), c), maxCauseLen)
}

// truncate shortens s to at most n bytes without splitting a character.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// failureNoteTimeout bounds the note of a failed refresh: in a NATS
// outage the retry must not wait for it.
const failureNoteTimeout = 2 * time.Second
