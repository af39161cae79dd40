// Package storm is the 401-storm load generator behind `publisher storm`:
// K credentials, N runtimes per credential, all reporting a 401 at once, in
// several waves, against a rotating and reuse-detecting authorization server.
//
// It runs the same storm through several ways of refreshing, side by side,
// and counts what each costs at the token endpoint:
//
//   - naive: every runtime refreshes for itself with x/oauth2;
//   - inprocess: P processes, each with a singleflight per credential;
//   - authbus: the runtimes publish auth.401, refresher pools refresh;
//   - ceiling: the bare NATS operations of one refresh plus the same
//     x/oauth2 call, with no authbus code and the same concurrency — the
//     most authbus could do on this machine and this endpoint.
//
// The accounting (calls per credential generation, reuses, needs_reauth,
// latency, throughput) is what the storm is for, so it is tested against
// known answers; the timings it reports are measurements, never assertions.
package storm

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/internal/authserver"
)

// Mode is one way of refreshing a storm's credentials.
type Mode string

// The modes a storm can run, in the order they are reported.
const (
	ModeNaive     Mode = "naive"     // every runtime refreshes for itself
	ModeInProcess Mode = "inprocess" // singleflight per process, P processes
	ModeAuthbus   Mode = "authbus"   // refresher pools behind NATS
	ModeCeiling   Mode = "ceiling"   // bare NATS operations + the same token call
)

// AllModes is every mode, in report order.
var AllModes = []Mode{ModeNaive, ModeInProcess, ModeAuthbus, ModeCeiling}

// ParseModes parses a comma-separated list of modes.
func ParseModes(s string) ([]Mode, error) {
	var out []Mode
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		m := Mode(part)
		switch m {
		case ModeNaive, ModeInProcess, ModeAuthbus, ModeCeiling:
			out = append(out, m)
		default:
			return nil, fmt.Errorf("mode %q is unknown; use a comma-separated list of naive, inprocess, authbus, ceiling", part)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no mode given; use a comma-separated list of naive, inprocess, authbus, ceiling")
	}
	return out, nil
}

// Config configures a storm. Zero values mean the documented defaults, which
// finish in well under a minute on a 2-core machine.
type Config struct {
	// Credentials is K, the number of credentials; 0 means 500.
	Credentials int
	// Runtimes is N, the runtimes sharing each credential, each of which
	// sees the 401; 0 means 8.
	Runtimes int
	// Waves is how often every credential's token is rejected, one wave
	// after the other settled; 0 means 3.
	Waves int
	// Modes to run, in this order; nil means all of AllModes.
	Modes []Mode
	// Processes is P for the inprocess mode: runtime r of a credential
	// lives in process r mod P; 0 means 4.
	Processes int
	// Pools is the number of in-process refresher pools (each on its own
	// connection, as separate processes would be) and of ceiling worker
	// groups; 0 means 2. Ignored for authbus with NATSURL.
	Pools int
	// Workers is the concurrency of each pool and of each ceiling worker
	// group; 0 means the workers package default (4×GOMAXPROCS, at least 8).
	Workers int
	// Publishers is the number of goroutines publishing 401s, and the
	// number of naive runtimes calling the token endpoint at once; 0 means 16.
	Publishers int
	// Probes is the number of one-at-a-time refreshes after the waves that
	// measure the latency authbus adds to the token-endpoint call when
	// nothing else is going on; 0 means 200 (enough for the p99 not to be
	// the largest probe), negative means none.
	Probes int

	// NATSURL joins an external deployment (its refreshers do the authbus
	// refreshes) instead of starting an embedded NATS server with pools in
	// this process. Its refreshers must reach the token endpoint.
	NATSURL string
	// NATSOptions are the options of every connection to NATSURL
	// (authentication, TLS, inbox prefix).
	NATSOptions []nats.Option
	// Prefix is the subject prefix of the deployment; "" means "auth".
	Prefix string

	// TokenURL is a real token endpoint to use instead of the built-in
	// authorization server; it is called with the client_credentials grant
	// (a storm cannot log K users in), so there are no refresh tokens to
	// reuse and calls per generation are known only on average.
	TokenURL string
	// ClientID and ClientSecret authenticate at TokenURL (HTTP Basic).
	ClientID, ClientSecret string

	// Latency is the built-in authorization server's answer time.
	Latency time.Duration
	// Failures is how many token calls at the start of every wave the
	// built-in server answers 503, as an overloaded server would.
	Failures int
	// Reuse is how the built-in server answers a spent refresh token.
	Reuse authserver.ReuseMode

	// PoolLog receives the JSON logs of the in-process refresher pools
	// (level info, as in production); nil formats them and drops them.
	PoolLog io.Writer

	// WaveTimeout bounds one wave; 0 means 2m.
	WaveTimeout time.Duration
	// Progress receives a line per mode and wave, and one a second while a
	// wave runs; nil means none.
	Progress io.Writer
}

func (c Config) withDefaults() Config {
	if c.Credentials == 0 {
		c.Credentials = 500
	}
	if c.Runtimes == 0 {
		c.Runtimes = 8
	}
	if c.Waves == 0 {
		c.Waves = 3
	}
	if c.Modes == nil {
		c.Modes = AllModes
	}
	if c.Processes == 0 {
		c.Processes = 4
	}
	if c.Pools == 0 {
		c.Pools = 2
	}
	if c.Workers == 0 {
		// The workers package default, so that the ceiling runs at the
		// concurrency the pools really have.
		c.Workers = max(8, 4*runtime.GOMAXPROCS(0))
	}
	if c.Publishers == 0 {
		c.Publishers = 16
	}
	if c.Probes == 0 {
		c.Probes = 200
	}
	if c.Prefix == "" {
		c.Prefix = "auth"
	}
	if c.WaveTimeout == 0 {
		c.WaveTimeout = 2 * time.Minute
	}
	if c.PoolLog == nil {
		c.PoolLog = io.Discard
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return c
}

func (c Config) validate() error {
	var errs []error
	for _, f := range []struct {
		name string
		v    int
	}{
		{"Credentials (--credentials)", c.Credentials}, {"Runtimes (--runtimes)", c.Runtimes},
		{"Waves (--waves)", c.Waves}, {"Processes (--processes)", c.Processes}, {"Pools (--pools)", c.Pools},
		{"Workers (--workers)", c.Workers}, {"Publishers (--publishers)", c.Publishers},
	} {
		if f.v < 1 {
			errs = append(errs, fmt.Errorf("%s is %d: set at least 1", f.name, f.v))
		}
	}
	if c.Failures < 0 {
		errs = append(errs, fmt.Errorf("Failures (--fail) is %d: set 0 or more", c.Failures))
	}
	if c.TokenURL != "" && (c.Latency != 0 || c.Failures != 0) {
		errs = append(errs, errors.New("latency and failures are knobs of the built-in authorization server: drop them, or drop the token URL"))
	}
	if c.TokenURL != "" && c.ClientID == "" {
		errs = append(errs, errors.New("a token URL needs a client id (--client-id) for the client_credentials grant"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("storm config: %w", err)
	}
	return nil
}

func (c Config) has(m Mode) bool {
	for _, x := range c.Modes {
		if x == m {
			return true
		}
	}
	return false
}
