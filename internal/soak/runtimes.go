package soak

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authserver"
)

// counters is what the runtimes, the authorization server and the
// refreshers' logs reported. Safe for concurrent use.
type counters struct {
	mu      sync.Mutex
	cur     []generation // per credential: the newest token the runtimes know of
	margins []float32    // seconds: a generation's expiry minus when its successor arrived
	lags    []float32    // seconds: how late a proactive refresh reached a refresher

	okCalls      []int32 // per credential: token calls answered with a token
	calls        int
	failedCalls  int
	outageCalls  int
	breakerOpens int // during the outage: refreshers' breakers that opened
	halfOpens    int // during the outage: half-open periods, each letting one probe through
	uses         [phases]int
	expired      [phases]int // tokens auth.token handed out after their expiry
	unauthorized [phases]int // 401s from the resource server
	reported     int         // auth.401 events the runtimes published
	tokenErrors  int         // auth.token requests that failed or were refused
	needsReauth  int
	warnings     int
	outcomes     map[string]int
	genesis      int // generations before the runtimes started (during registration)
}

// generations is how many new tokens the runtimes learned of, in all.
// The caller holds mu.
func (c *counters) generations() int {
	n := 0
	for _, g := range c.cur {
		n += int(max(g.version-1, 0))
	}
	return n
}

// markStart remembers the generations so far, so that rates count the
// soak alone.
func (c *counters) markStart() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.genesis = c.generations()
}

// generation is a credential's token as the runtimes know it.
type generation struct {
	version   int64
	expiresAt time.Time
	reauth    bool
}

func newCounters(n int) *counters {
	return &counters{cur: make([]generation, n), okCalls: make([]int32, n), outcomes: map[string]int{}}
}

// onCall counts a token-endpoint call, by the credential its client
// stands for.
func (c *counters) onCall(since func(time.Time) (time.Duration, phase)) func(authserver.Call) {
	return func(call authserver.Call) {
		i, ok := credIndex(strings.TrimPrefix(call.ClientID, "soak-c"), len(c.cur))
		_, ph := since(call.At)
		c.mu.Lock()
		defer c.mu.Unlock()
		c.calls++
		if call.Status == http.StatusOK && ok {
			c.okCalls[i]++
		} else if call.Status == 0 || call.Status >= 500 || call.Dropped {
			c.failedCalls++
		}
		if ph == phaseOutage {
			c.outageCalls++
		}
	}
}

// rotated records that credential i has version v expiring at exp.
func (c *counters) rotated(i int, v int64, exp time.Time, counting bool) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	g := &c.cur[i]
	if v <= g.version {
		return
	}
	if counting && g.version >= 1 && !g.expiresAt.IsZero() {
		c.margins = append(c.margins, float32(g.expiresAt.Sub(now).Seconds()))
	}
	*g = generation{version: v, expiresAt: exp}
}

func (c *counters) line(elapsed, total time.Duration) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	gens := c.generations() - c.genesis
	sum := func(a [phases]int) int { return a[0] + a[1] + a[2] }
	return fmt.Sprintf("%v/%v: %d rotations (%.0f/s), %d token calls (%d failed), %d uses, %d expired tokens handed out, %d runtime 401s, %d needs_reauth",
		elapsed.Round(time.Second), total, gens, float64(gens)/max(elapsed.Seconds(), 1), c.calls, c.failedCalls,
		sum(c.uses), sum(c.expired), sum(c.unauthorized), c.needsReauth)
}

// credIndex parses the index of a credential from "<i>".
func credIndex(s string, n int) (int, bool) {
	i, err := strconv.Atoi(s)
	return i, err == nil && i >= 0 && i < n
}

// watch follows the run's auth.rotated and auth.needs_reauth events, as
// the runtimes' client libraries would.
func (s *soak) watch() error {
	for _, t := range []events.Type{events.TypeRotated, events.TypeNeedsReauth} {
		sub, err := s.nc.Subscribe(s.subj.Prefix()+"."+t.Word()+"."+s.run+".>", func(m *nats.Msg) { s.onEvent(t, m) })
		if err != nil {
			return fmt.Errorf("soak: subscribe to %s: %w", t, err)
		}
		// Every rotation of the fleet arrives here: dropping one would
		// miss a generation.
		_ = sub.SetPendingLimits(-1, -1)
	}
	return s.nc.Flush()
}

func (s *soak) onEvent(t events.Type, m *nats.Msg) {
	_, key, err := s.subj.ParseEvent(m.Subject)
	if err != nil {
		return
	}
	i, ok := credIndex(strings.TrimPrefix(key.User, "u"), len(s.keys))
	if !ok {
		return
	}
	ev, err := events.Decode(t, key, m.Data)
	if err != nil {
		return
	}
	if t == events.TypeNeedsReauth {
		s.stats.mu.Lock()
		if !s.stats.cur[i].reauth {
			s.stats.cur[i].reauth = true
			s.stats.needsReauth++
		}
		s.stats.mu.Unlock()
		return
	}
	_, counting := s.started()
	s.stats.rotated(i, ev.Rotated.Version, ev.Rotated.ExpiresAt, counting)
}

// register registers every credential with a fresh login's tokens, 64 at a
// time, each with a lifetime of its own between T/4 and T.
func (s *soak) register(ctx context.Context) error {
	var done atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(s.cfg.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				s.progress("registered %d/%d", done.Load(), len(s.keys))
			case <-stop:
				return
			}
		}
	})
	defer wg.Wait()
	defer close(stop)
	var g errgroup.Group
	g.SetLimit(64)
	life := int64(s.cfg.Lifetime / time.Second)
	for i, key := range s.keys {
		g.Go(func() error {
			tok, err := s.as.Issue(clientID(i))
			if err != nil {
				return err
			}
			body, err := json.Marshal(events.RegisterRequest{
				Token: events.RegisterToken{AccessToken: tok.AccessToken, TokenType: tok.TokenType, RefreshToken: tok.RefreshToken,
					ExpiresIn: life/4 + rand.Int64N(life-life/4+1)},
				TokenEndpoint: s.as.TokenURL(),
				ClientID:      clientID(i),
				ClientSecret:  clientSecret(i),
				AuthStyle:     events.AuthStyleBasic,
				Grant:         events.GrantRefreshToken,
			})
			if err != nil {
				return err
			}
			var msg *nats.Msg
			for attempt := 1; ; attempt++ {
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				msg, err = s.nc.RequestWithContext(rctx, s.subj.Register(key), body)
				cancel()
				if err == nil && msg.Header.Get("Nats-Service-Error-Code") == "503" && attempt < 100 {
					// The refresher that answered serves as many of this
					// tenant's requests as it may: retry shortly, as the
					// protocol says (the soak is one tenant).
					select {
					case <-time.After(time.Duration(10+rand.IntN(40)) * time.Millisecond):
					case <-ctx.Done():
					}
					continue
				}
				if err == nil || attempt >= 3 || ctx.Err() != nil {
					break
				}
			}
			if err != nil {
				return fmt.Errorf("register %s: %w; see the refreshers' log (--log)", key, err)
			}
			if code := msg.Header.Get("Nats-Service-Error-Code"); code != "" {
				return fmt.Errorf("register %s: refused with %s: %s", key, code, msg.Header.Get("Nats-Service-Error"))
			}
			var reply events.RegisterReply
			if err := json.Unmarshal(msg.Data, &reply); err != nil {
				return fmt.Errorf("register %s: reply: %w", key, err)
			}
			s.stats.rotated(i, reply.Version, reply.ExpiresAt, false)
			done.Add(1)
			return nil
		})
	}
	return g.Wait()
}

// runtimeWorkers is how many runtime requests run at once.
const runtimeWorkers = 32

// use is the runtimes: until ctx ends, each credential's token is used
// every UseEvery (at most MaxUses a second in all) by asking auth.token for
// it, as a runtime without a token cache does, and calling the resource
// server with it. A 401 is reported as the protocol's recipe says.
func (s *soak) use(ctx context.Context) {
	rate := min(float64(s.cfg.MaxUses), float64(len(s.keys))/s.cfg.UseEvery.Seconds())
	next := make(chan int, runtimeWorkers)
	var wg sync.WaitGroup
	for range runtimeWorkers {
		wg.Go(func() {
			for i := range next {
				s.useOne(ctx, i)
			}
		})
	}
	defer wg.Wait()
	defer close(next)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	start, sent, i := time.Now(), 0, rand.IntN(len(s.keys))
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for due := int(rate * time.Since(start).Seconds()); sent < due; sent++ {
			select {
			case next <- i:
			case <-ctx.Done():
				return
			}
			i = (i + 1) % len(s.keys)
		}
	}
}

// useOne is one use of credential i's token.
func (s *soak) useOne(ctx context.Context, i int) {
	key := s.keys[i]
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	msg, err := s.nc.RequestWithContext(rctx, s.subj.Token(key), nil)
	cancel()
	if ctx.Err() != nil {
		return
	}
	var tok events.Rotated
	if err == nil && msg.Header.Get("Nats-Service-Error-Code") == "" {
		err = json.Unmarshal(msg.Data, &tok)
	} else if err == nil {
		err = errors.New(msg.Header.Get("Nats-Service-Error"))
	}
	now := time.Now()
	_, ph := s.since(now)
	if err != nil {
		s.stats.mu.Lock()
		s.stats.tokenErrors++
		s.stats.mu.Unlock()
		return
	}
	status := s.rs.call(ctx, tok.AccessToken)
	if ctx.Err() != nil {
		return
	}
	s.stats.mu.Lock()
	s.stats.uses[ph]++
	if !tok.ExpiresAt.IsZero() && !tok.ExpiresAt.After(now) {
		s.stats.expired[ph]++
	}
	if status == http.StatusUnauthorized {
		s.stats.unauthorized[ph]++
	}
	s.stats.mu.Unlock()
	if status == http.StatusUnauthorized {
		// The recipe: report the refused token; the refreshers answer with
		// auth.rotated, which the watch above follows.
		data, err := events.Encode(key, "soak/runtime", events.Unauthorized{Fingerprint: tok.Fingerprint, Runtime: "soak", Status: 401})
		if err == nil {
			_, err = s.js.Publish(ctx, s.subj.Event(events.Type401, key), data,
				jetstream.WithMsgID(events.MsgID(events.Type401, key, tok.Fingerprint)))
		}
		if err == nil {
			s.stats.mu.Lock()
			s.stats.reported++
			s.stats.mu.Unlock()
		}
	}
}

// resourceServer is the API the runtimes call: it asks the authorization
// server whether each bearer token is valid (issued, not expired, not
// revoked) and answers 401 to any other.
type resourceServer struct {
	srv    *http.Server
	url    string
	client *http.Client
	done   chan struct{}
}

func startResourceServer(as *authserver.Server) (*resourceServer, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("soak: resource server: %w", err)
	}
	rs := &resourceServer{url: "http://" + l.Addr().String() + "/resource", done: make(chan struct{})}
	rs.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !as.ValidAccessToken(tok) {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			http.Error(w, "invalid token", http.StatusUnauthorized)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})}
	go func() {
		defer close(rs.done)
		_ = rs.srv.Serve(l)
	}()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = runtimeWorkers
	rs.client = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	return rs, nil
}

// call makes one request with tok and returns the status, 0 when there
// was no answer.
func (rs *resourceServer) call(ctx context.Context, tok string) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rs.url, nil)
	if err != nil {
		return 0
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := rs.client.Do(req)
	if err != nil {
		return 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func (rs *resourceServer) close() {
	_ = rs.srv.Close()
	<-rs.done
	rs.client.CloseIdleConnections()
}

// logSink reads a refresher's JSON log: how late each scheduled refresh
// arrived, the outcome of each event, and warnings, which it passes on.
// Safe for concurrent use.
type logSink struct {
	c     *counters
	out   io.Writer
	since func(time.Time) (time.Duration, phase)
	mu    sync.Mutex
	buf   []byte
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.line(l.buf[:i])
		l.buf = l.buf[i+1:]
	}
	if len(l.buf) == 0 {
		l.buf = nil // let a large buffer go
	}
	return len(p), nil
}

// breakerChanged is the message of a refresher's log line for a breaker
// that changed state (workers logs it at WARN with "from" and "to").
const breakerChanged = "token endpoint breaker changed state"

func (l *logSink) line(line []byte) {
	warn := bytes.Contains(line, []byte(`"level":"WARN"`)) || bytes.Contains(line, []byte(`"level":"ERROR"`))
	processed := bytes.Contains(line, []byte(`"msg":"event processed"`))
	if warn {
		_, _ = l.out.Write(append(line, '\n'))
	}
	if !warn && !processed {
		return
	}
	var rec struct {
		Time    time.Time `json:"time"`
		Msg     string    `json:"msg"`
		Outcome string    `json:"outcome"`
		Lag     *int64    `json:"schedule_lag"`
		From    string    `json:"from"`
		To      string    `json:"to"`
	}
	_ = json.Unmarshal(line, &rec)
	l.c.mu.Lock()
	defer l.c.mu.Unlock()
	if warn {
		l.c.warnings++
	}
	if rec.Msg == breakerChanged {
		if _, ph := l.since(rec.Time); ph == phaseOutage {
			switch {
			case rec.From == "closed" && rec.To == "open":
				l.c.breakerOpens++
			case rec.To == "half-open":
				l.c.halfOpens++
			}
		}
	}
	if processed {
		l.c.outcomes[rec.Outcome]++
		if rec.Lag != nil {
			l.c.lags = append(l.c.lags, float32(time.Duration(*rec.Lag).Seconds()))
		}
	}
}
