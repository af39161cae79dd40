package client

import (
	"errors"
	"fmt"
)

// Errors a caller may need to tell apart (errors.Is). Each returned error
// wraps one of them and says, in its text, what to do.
var (
	// ErrNotFound: no credential is registered under the key. Register it
	// (auth.register, or `publisher register`) before using it.
	ErrNotFound = errors.New("credential not registered")
	// ErrUnavailable: no refresher answered, or it could not answer now.
	// Check that refreshers are running; retrying later may succeed.
	ErrUnavailable = errors.New("token service unavailable")
	// ErrRefused: the token service refused the request as malformed or
	// forbidden; retrying the same request will not help.
	ErrRefused = errors.New("token request refused")
	// ErrTimeout: after a 401, no new token arrived within the wait bound
	// (WithWaitTimeout).
	ErrTimeout = errors.New("no new token in time")
	// ErrClosed: the Source was closed.
	ErrClosed = errors.New("source closed")
)

// NeedsReauthError says that the credential cannot be refreshed until a
// person logs in again and registers the new tokens (auth.register). It is
// what a Transport returns instead of retrying, and what Token returns while
// the credential is in that state. Match it with errors.As.
type NeedsReauthError struct {
	// Key is the credential key, "tenant.user.server".
	Key string
	// Reason is the token endpoint's OAuth error code ("invalid_grant",
	// "invalid_client", …) or authbus's own ("no_refresh_token").
	Reason string
	// Description is the token endpoint's error_description, as given; it
	// may be empty.
	Description string
	// Version is the credential generation that failed, or 0 when the
	// token service reported the state without one.
	Version int64
}

// Error says what happened and what to do.
func (e *NeedsReauthError) Error() string {
	detail := e.Reason
	if e.Description != "" {
		detail += ": " + e.Description
	}
	return fmt.Sprintf("credential %s needs a new login (%s); log in again and register the new tokens for %s", e.Key, detail, e.Key)
}
