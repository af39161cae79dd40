package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/oauth2"
	"golang.org/x/sync/singleflight"

	"github.com/authbus/authbus/events"
)

// tracerName is the instrumentation scope of every span this package starts.
const tracerName = "github.com/authbus/authbus/client"

// Source is the access token of one credential, kept current from the bus.
// Create it with New and Close it when done. It implements
// oauth2.TokenSource and is safe for concurrent use.
//
// Token answers from a local copy. The copy is filled by an auth.token
// request on first use and whenever it is missing or expired, and is
// replaced by every auth.rotated of a newer version; an auth.needs_reauth of
// the held version or newer turns it into a *NeedsReauthError. Events of an
// older version than the one held are ignored, so a late re-announcement
// never replaces a newer token. Concurrent callers that find no usable copy
// share one request; no network call is made while a lock is held.
type Source struct {
	wire
	log   *slog.Logger
	subs  []*nats.Subscription
	calls singleflight.Group // shares token requests and 401 reports between goroutines

	// ctx is canceled by Close; the work the Source owns (shared requests,
	// reports) stops with it, and wg waits for that work to end.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu         sync.Mutex
	closed     bool
	version    int64             // the newest version seen, of a token or of a needs_reauth
	tok        *events.Rotated   // the token in force; nil when none is held
	receivedAt time.Time         // when tok arrived
	reauth     *NeedsReauthError // set while the credential needs a new login
	reauthAt   time.Time         // when reauth was last confirmed
	changed    chan struct{}     // closed and replaced whenever tok or reauth changes
	expiring   *time.Timer       // the pending auth.expiring report (WithExpiring)

	// onEvent, a test hook (export_test.go), sees every token or
	// needs_reauth considered, and whether it was applied.
	onEvent func(from string, version int64, applied bool)
}

// New returns a Source for the credential key ("tenant.user.server") on the
// caller's connection nc, which it uses but does not own. It subscribes to
// the key's auth.rotated and auth.needs_reauth events and waits for the
// server to confirm the subscriptions, so that no rotation after New
// returns is missed; the token itself is fetched on first use.
func New(nc *nats.Conn, key string, opts ...Option) (*Source, error) {
	w, err := newWire("client.New", nc, key, opts)
	if err != nil {
		return nil, err
	}
	k, subj, cfg := w.key, w.subj, w.cfg
	ctx, cancel := context.WithCancel(context.Background())
	s := &Source{
		wire:    w,
		log:     cfg.logger.With("key", k.String()),
		ctx:     ctx,
		cancel:  cancel,
		changed: make(chan struct{}),
	}
	for _, sub := range []struct {
		t events.Type
		h nats.MsgHandler
	}{
		{events.TypeRotated, s.onRotated},
		{events.TypeNeedsReauth, s.onNeedsReauth},
	} {
		ns, err := nc.Subscribe(subj.Event(sub.t, k), sub.h)
		if err != nil {
			s.unsubscribe()
			cancel()
			return nil, fmt.Errorf("client.New: subscribe to %s: %w; check the connection and the user's subscribe permissions", subj.Event(sub.t, k), err)
		}
		s.subs = append(s.subs, ns)
	}
	if err := nc.FlushTimeout(cfg.requestTimeout); err != nil {
		s.unsubscribe()
		cancel()
		return nil, fmt.Errorf("client.New: confirming the subscriptions of %s: %w; check that the NATS connection is up", k, err)
	}
	return s, nil
}

// Key returns the credential key of the Source.
func (s *Source) Key() events.Key { return s.key }

// Token returns the current access token, as oauth2.TokenSource requires. It
// is TokenContext with a background context: the request it may make is
// still bounded by WithRequestTimeout.
func (s *Source) Token() (*oauth2.Token, error) { return s.TokenContext(context.Background()) }

// TokenContext returns the current access token. It makes no network call
// while the local copy is valid. Otherwise it asks the token service, and
// returns the token it gets even if that has already expired (the
// refreshers replace it on the first 401 it causes). Errors: a
// *NeedsReauthError, or errors wrapping ErrNotFound, ErrUnavailable,
// ErrRefused or ErrClosed, or ctx's error.
func (s *Source) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	r, err := s.current(ctx)
	if err != nil {
		return nil, err
	}
	return oauthToken(r), nil
}

// oauthToken converts the wire form; Type() of the result turns Dex's
// "bearer" into "Bearer".
func oauthToken(r events.Rotated) *oauth2.Token {
	return &oauth2.Token{AccessToken: r.AccessToken, TokenType: r.TokenType, Expiry: r.ExpiresAt}
}

// Close unsubscribes, stops a pending auth.expiring report, and waits for
// requests and reports in flight to end (they are canceled). Later calls to
// Token fail with ErrClosed. Close does not close the connection. It is
// safe to call more than once.
func (s *Source) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	if s.expiring != nil {
		s.expiring.Stop()
	}
	s.mu.Unlock()
	s.cancel()
	err := s.unsubscribe()
	s.wg.Wait()
	return err
}

func (s *Source) unsubscribe() error {
	var errs []error
	for _, sub := range s.subs {
		if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
			errs = append(errs, fmt.Errorf("unsubscribe %s: %w", sub.Subject, err))
		}
	}
	return errors.Join(errs...)
}

// enter registers a piece of owned work; it fails once Close has begun, so
// that Close's wait covers everything started.
func (s *Source) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// shared runs fn once for all concurrent callers with the same name, under a
// context that keeps the first caller's values (its trace) but not its
// cancellation, bounded by WithRequestTimeout and by Close. Each caller
// waits only as long as its own ctx allows.
func (s *Source) shared(ctx context.Context, name string, fn func(context.Context) error) error {
	ch := s.calls.DoChan(name, func() (any, error) {
		if !s.enter() {
			return nil, fmt.Errorf("client: %s: %w", s.key, ErrClosed)
		}
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.requestTimeout)
		defer cancel()
		stop := context.AfterFunc(s.ctx, cancel)
		defer stop()
		return nil, fn(ctx)
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return fmt.Errorf("client: %s for %s: %w", name, s.key, ctx.Err())
	}
}

// snapshot is the state Token and the Transport decide on.
type snapshot struct {
	tok      *events.Rotated
	version  int64
	reauth   *NeedsReauthError
	reauthAt time.Time
	changed  <-chan struct{}
	closed   bool
}

// reauthErr returns a copy of the needs-re-auth error, so that no caller
// can change what the next one gets.
func (st snapshot) reauthErr() error {
	e := *st.reauth
	return &e
}

func (s *Source) snapshot() snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return snapshot{tok: s.tok, version: s.version, reauth: s.reauth, reauthAt: s.reauthAt,
		changed: s.changed, closed: s.closed}
}

// current returns the token in force, fetching it when the local copy is
// missing or expired.
func (s *Source) current(ctx context.Context) (events.Rotated, error) {
	fetched := false
	for {
		st := s.snapshot()
		switch {
		case st.closed:
			return events.Rotated{}, fmt.Errorf("client: token for %s: %w; create a new Source", s.key, ErrClosed)
		case st.reauth != nil && (fetched || time.Since(st.reauthAt) < reauthRecheck):
			return events.Rotated{}, st.reauthErr()
		case st.tok != nil && (fetched || !expired(st.tok, time.Now())):
			return *st.tok, nil
		case fetched:
			// Not expected: a reply that is not applied means a newer
			// event was.
			return events.Rotated{}, fmt.Errorf("client: token for %s: the token service answered but no token is held: %w; retry", s.key, ErrUnavailable)
		}
		if err := s.fetch(ctx); err != nil {
			return events.Rotated{}, err
		}
		fetched = true
	}
}

// expired reports whether t has passed its expiry.
func expired(t *events.Rotated, now time.Time) bool {
	return !t.ExpiresAt.IsZero() && !now.Before(t.ExpiresAt)
}

// fetch asks the token service for the current token and applies the
// answer; concurrent callers share one request.
func (s *Source) fetch(ctx context.Context) error {
	return s.shared(ctx, "requesting the token", s.requestToken)
}

// requestToken is one auth.token request; it applies the answer.
func (s *Source) requestToken(ctx context.Context) error {
	since := s.snapshot().version
	r, err := s.askToken(ctx)
	var nre *NeedsReauthError
	switch {
	case errors.As(err, &nre):
		// Recorded unless something newer than what was held when the
		// request was sent has arrived meanwhile.
		s.applyReauth(&events.NeedsReauth{Reason: nre.Reason, Version: since}, since, true)
		return nil
	case err != nil && errors.Is(err, context.Canceled) && s.ctx.Err() != nil:
		return fmt.Errorf("client: token for %s: %w", s.key, ErrClosed)
	case err != nil:
		return err
	}
	s.applyRotated(r, "reply")
	return nil
}

// onRotated handles an auth.rotated event.
func (s *Source) onRotated(m *nats.Msg) {
	ev, err := events.Decode(events.TypeRotated, s.key, m.Data)
	if err != nil {
		s.log.Warn("ignoring a malformed auth.rotated event", "error", err)
		return
	}
	s.applyRotated(ev.Rotated, "rotated")
}

// onNeedsReauth handles an auth.needs_reauth event.
func (s *Source) onNeedsReauth(m *nats.Msg) {
	ev, err := events.Decode(events.TypeNeedsReauth, s.key, m.Data)
	if err != nil {
		s.log.Warn("ignoring a malformed auth.needs_reauth event", "error", err)
		return
	}
	s.applyReauth(ev.NeedsReauth, ev.NeedsReauth.Version, false)
}

// applyRotated installs r if it is newer than anything held; from says
// where it came from ("rotated" event or token "reply"), for the test hook.
func (s *Source) applyRotated(r *events.Rotated, from string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	applied := !s.closed && r.Version > s.version
	if applied {
		s.version, s.tok, s.receivedAt = r.Version, r, time.Now()
		s.reauth = nil
		s.notifyLocked()
		s.scheduleExpiringLocked()
	}
	if s.onEvent != nil {
		s.onEvent(from, r.Version, applied)
	}
}

// applyReauth records that the credential needs a new login. An event
// applies when its version is at least the one held: needs_reauth carries
// the version of the generation that failed. A reply (fromReply) carries no
// version and applies only if nothing new arrived since its request.
func (s *Source) applyReauth(nr *events.NeedsReauth, version int64, fromReply bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	applied := !s.closed && version >= s.version && (!fromReply || version == s.version)
	if applied {
		s.version, s.tok = version, nil
		s.reauth = &NeedsReauthError{Key: s.key.String(), Reason: nr.Reason, Description: nr.ErrorDescription, Version: version}
		s.reauthAt = time.Now()
		if s.expiring != nil {
			s.expiring.Stop()
		}
		s.notifyLocked()
	}
	if s.onEvent != nil && !fromReply {
		s.onEvent("needs_reauth", version, applied)
	}
}

// notifyLocked wakes everyone waiting for a change.
func (s *Source) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Client returns an *http.Client whose Transport is a Transport of s over
// http.DefaultTransport. Build your own http.Client with a Transport to set
// timeouts or another base transport.
func (s *Source) Client() *http.Client { return &http.Client{Transport: &Transport{Source: s}} }
