package client

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/authbus/authbus/events"
)

// Defaults of the options.
const (
	// DefaultWaitTimeout bounds how long a Transport waits for a new token
	// after a 401 (WithWaitTimeout).
	DefaultWaitTimeout = 30 * time.Second
	// DefaultRequestTimeout bounds one auth.token request or one JetStream
	// publish (WithRequestTimeout).
	DefaultRequestTimeout = 5 * time.Second
	// DefaultRecheckInterval is how long a Source waits, after reporting a
	// 401 and asking auth.token at once, before it asks again
	// (WithRecheckInterval).
	DefaultRecheckInterval = 2 * time.Second
)

// maxRecheckFactor caps the growth of the gap between re-asks: it doubles
// from the recheck interval up to this multiple of it.
const maxRecheckFactor = 4

// reauthRecheck is how long a needs-re-auth answer is trusted without a
// network call. The auth.rotated of a re-registration clears it at once;
// the recheck only matters if that event was missed during a disconnect.
const reauthRecheck = 30 * time.Second

// Option configures a Source; pass options to New.
type Option func(*config)

// config is what the options set; zero values mean the defaults.
type config struct {
	prefix         string
	runtime        string
	wait           time.Duration
	requestTimeout time.Duration
	recheck        time.Duration
	expiring       bool
	logger         *slog.Logger
}

// WithPrefix sets the subject prefix of the authbus deployment, "auth" by
// default. It must match the refreshers' prefix.
func WithPrefix(prefix string) Option { return func(c *config) { c.prefix = prefix } }

// WithRuntime names this runtime in the auth.401 events it publishes (the
// "runtime" field, at most events.MaxRuntimeLen bytes) and in their
// CloudEvents source ("authbus/client/<runtime>"). The default is the host
// name.
func WithRuntime(name string) Option { return func(c *config) { c.runtime = name } }

// WithWaitTimeout bounds how long a Transport waits, after reporting a 401,
// for a token with a different fingerprint before the request fails with
// ErrTimeout; the request's context bounds it too. The default is
// DefaultWaitTimeout: long enough for a refresh through a slow token
// endpoint.
func WithWaitTimeout(d time.Duration) Option { return func(c *config) { c.wait = d } }

// WithRequestTimeout bounds one auth.token request and one JetStream
// publish. The default is DefaultRequestTimeout.
func WithRequestTimeout(d time.Duration) Option {
	return func(c *config) { c.requestTimeout = d }
}

// WithRecheckInterval sets how long a Source waits for the auth.rotated
// event of a new token, after reporting a 401 and asking auth.token at
// once, before it asks auth.token again; the gap then doubles, up to four
// times d, until the wait bound (WithWaitTimeout). The re-asks only cover an
// event missed during a reconnect; the answer normally comes from the ask
// right after the report or from the event. The default is
// DefaultRecheckInterval.
func WithRecheckInterval(d time.Duration) Option { return func(c *config) { c.recheck = d } }

// WithExpiring makes the Source publish auth.expiring for the token it holds
// when that token is close to expiry, by the same rule as the refreshers'
// scheduler: 10 % of the token's lifetime before expiry, clamped to 30s–10m
// and never more than half the lifetime. The lifetime is counted from when
// the Source received the token, since events do not carry the issue time.
// Refreshers schedule the same refresh themselves; this is for deployments
// that want the runtime to ask as well. Reports of one token by many
// runtimes are de-duplicated by the events stream.
func WithExpiring() Option { return func(c *config) { c.expiring = true } }

// WithLogger sets where the Source logs what it cannot return to a caller
// (malformed events, a failed auth.expiring report). The default is
// slog.Default().
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// withDefaults fills in what the options left zero.
func (c config) withDefaults() config {
	if c.runtime == "" {
		c.runtime, _ = os.Hostname()
		if c.runtime == "" {
			c.runtime = "go-client"
		}
		if len(c.runtime) > events.MaxRuntimeLen {
			c.runtime = c.runtime[:events.MaxRuntimeLen]
		}
	}
	if c.wait == 0 {
		c.wait = DefaultWaitTimeout
	}
	if c.requestTimeout == 0 {
		c.requestTimeout = DefaultRequestTimeout
	}
	if c.recheck == 0 {
		c.recheck = DefaultRecheckInterval
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	return c
}

// validate returns every problem at once.
func (c config) validate() error {
	var errs []error
	if len(c.runtime) > events.MaxRuntimeLen {
		errs = append(errs, fmt.Errorf("WithRuntime: the name is %d bytes; use at most %d", len(c.runtime), events.MaxRuntimeLen))
	}
	if c.wait < 0 {
		errs = append(errs, fmt.Errorf("WithWaitTimeout: %v is negative; pass a positive duration, or leave it out for %v", c.wait, DefaultWaitTimeout))
	}
	if c.requestTimeout < 0 {
		errs = append(errs, fmt.Errorf("WithRequestTimeout: %v is negative; pass a positive duration, or leave it out for %v", c.requestTimeout, DefaultRequestTimeout))
	}
	if c.recheck < 0 {
		errs = append(errs, fmt.Errorf("WithRecheckInterval: %v is negative; pass a positive duration, or leave it out for %v", c.recheck, DefaultRecheckInterval))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("client options: %w", err)
	}
	return nil
}

// source is the CloudEvents source of the events this Source publishes.
func (c config) source() string { return "authbus/client/" + c.runtime }
