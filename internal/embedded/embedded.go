// Package embedded runs the NATS server with JetStream inside the refresher
// process: the default deployment, where one binary is the whole system.
package embedded

import (
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config configures the embedded server.
type Config struct {
	// Listen is the client address, host:port; port 0 picks a free one.
	Listen string
	// DataDir holds the JetStream store (under DataDir/jetstream).
	DataDir string
	// Logger receives the server's log; nil discards it.
	Logger *slog.Logger
	// ReadyTimeout bounds start-up; 0 means 10s.
	ReadyTimeout time.Duration
	// ConfigFile is a standard nats-server configuration file (accounts,
	// users and permissions, TLS, limits), loaded before the settings
	// above apply: Listen is used only when the file sets no host or port,
	// DataDir only when it sets no store_dir, JetStream is always on, and
	// the store is synced to disk on every write unless the file sets
	// jetstream.sync_interval. "" means none.
	ConfigFile string
	// JetStreamKey encrypts the JetStream store at rest (the server's
	// jetstream.key); "" leaves it as the file says, or unencrypted. Once a
	// store is encrypted, every later start needs the same key.
	JetStreamKey string
}

// Start starts a JetStream-enabled server and waits until it accepts
// connections. The caller shuts it down (Shutdown, WaitForShutdown).
func Start(cfg Config) (*server.Server, error) {
	host, portStr, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w; use host:port, e.g. 127.0.0.1:4222", cfg.Listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("listen address %q: port %q is not a number from 0 to 65535", cfg.Listen, portStr)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	opts := &server.Options{}
	if cfg.ConfigFile != "" {
		if opts, err = server.ProcessConfigFile(cfg.ConfigFile); err != nil {
			return nil, fmt.Errorf("NATS config file %s: %w; check it with: nats-server -t -c %s", cfg.ConfigFile, err, cfg.ConfigFile)
		}
	}
	if opts.ServerName == "" {
		opts.ServerName = "authbus-embedded"
	}
	if opts.Host == "" && opts.Port == 0 {
		opts.Host, opts.Port = host, port
	}
	if opts.StoreDir == "" {
		opts.StoreDir = filepath.Join(cfg.DataDir, "jetstream")
	}
	if cfg.JetStreamKey != "" {
		opts.JetStreamKey = cfg.JetStreamKey
	}
	if opts.SyncInterval == 0 && !opts.SyncAlways {
		// Acknowledged means on disk: with nats-server's default (an fsync
		// every two minutes) a power loss or kernel crash can lose writes
		// the server acknowledged (Jepsen, NATS 2.12.1, December 2025). For
		// authbus a lost rotation is a lost refresh token: a forced login,
		// or the spent token presented again. A config file's
		// sync_interval is left as it says.
		opts.SyncAlways = true
	}
	opts.JetStream = true
	// The refresher handles signals itself, and logs through slog.
	opts.NoSigs = true
	opts.NoLog = cfg.Logger == nil
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	if cfg.Logger != nil {
		s.SetLoggerV2(slogAdapter{cfg.Logger.With("component", "nats-server")}, false, false, false)
	}
	s.Start()
	timeout := cfg.ReadyTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	if !s.ReadyForConnections(timeout) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not accept connections on %s within %v; is the port in use? pick another with --listen", cfg.Listen, timeout)
	}
	return s, nil
}

// slogAdapter routes the server's log through slog.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Noticef(format string, v ...any) { a.l.Info(fmt.Sprintf(format, v...)) }
func (a slogAdapter) Warnf(format string, v ...any)   { a.l.Warn(fmt.Sprintf(format, v...)) }
func (a slogAdapter) Fatalf(format string, v ...any)  { a.l.Error(fmt.Sprintf(format, v...)) }
func (a slogAdapter) Errorf(format string, v ...any)  { a.l.Error(fmt.Sprintf(format, v...)) }
func (a slogAdapter) Debugf(format string, v ...any)  { a.l.Debug(fmt.Sprintf(format, v...)) }
func (a slogAdapter) Tracef(format string, v ...any)  { a.l.Debug(fmt.Sprintf(format, v...)) }
