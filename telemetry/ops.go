package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// ReadyTimeout bounds one readiness check: a probe that hangs is worse than
// one that says "not ready".
const ReadyTimeout = 2 * time.Second

// OpsConfig configures the operations listener.
type OpsConfig struct {
	// Addr is the listen address, such as "127.0.0.1:9464" (":0" picks a
	// free port). Required.
	Addr string
	// Metrics serves /metrics; nil answers 404 there.
	Metrics http.Handler
	// Ready is asked by /readyz; nil means always ready. Its error text is
	// shown to the prober, so it must never hold a secret.
	Ready func(context.Context) error
	// Logger receives the listener's own failures; nil means slog.Default().
	Logger *slog.Logger
}

// OpsServer is the running operations listener: /healthz answers 200 while
// the process serves HTTP at all, /readyz answers 200 when Ready says so and
// 503 with the reason otherwise, and /metrics serves Metrics. Stop it with
// Shutdown.
type OpsServer struct {
	srv  *http.Server
	ln   net.Listener
	done chan error

	once    sync.Once
	stopErr error
}

// StartOps binds cfg.Addr now, so that a port in use fails the start, and
// serves in a goroutine that Shutdown ends.
func StartOps(cfg OpsConfig) (*OpsServer, error) {
	if cfg.Addr == "" {
		return nil, errors.New("ops listener: Addr is empty; set a host:port such as 127.0.0.1:9464")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if cfg.Ready != nil {
			ctx, cancel := context.WithTimeout(r.Context(), ReadyTimeout)
			defer cancel()
			if err := cfg.Ready(ctx); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintln(w, "not ready:", strings.ReplaceAll(err.Error(), "\n", "; "))
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	if cfg.Metrics != nil {
		mux.Handle("GET /metrics", cfg.Metrics)
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("ops listener on %s: %w; choose another --metrics-addr, or \"\" to disable it", cfg.Addr, err)
	}
	s := &OpsServer{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 5 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn),
		},
		ln:   ln,
		done: make(chan error, 1),
	}
	go func() {
		err := s.srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		s.done <- err
	}()
	return s, nil
}

// Addr is the address the listener is bound to.
func (s *OpsServer) Addr() string { return s.ln.Addr().String() }

// Shutdown stops accepting connections, waits for requests in flight (until
// ctx is done, then it closes them) and for the serving goroutine to end.
// Later calls return the first call's result.
func (s *OpsServer) Shutdown(ctx context.Context) error {
	s.once.Do(func() {
		err := s.srv.Shutdown(ctx)
		if err != nil {
			_ = s.srv.Close()
		}
		if serveErr := <-s.done; serveErr != nil && err == nil {
			err = serveErr
		}
		if err != nil {
			s.stopErr = fmt.Errorf("ops listener shutdown: %w", err)
		}
	})
	return s.stopErr
}
