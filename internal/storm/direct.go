package storm

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
)

// direct is the naive and the inprocess mode: the runtimes call the token
// endpoint themselves, without NATS.
//
// Between waves the runtimes of a credential start again from the newest
// tokens any of them got, as if they shared a file or a person had logged
// in again; within a wave they share nothing but their process (inprocess).
// Naive is inprocess with a process per runtime.
type direct struct {
	cfg   Config
	ep    *endpoint
	run   string
	procs int
	rt    []string // per credential: the refresh token every runtime starts the wave with
}

func newDirect(cfg Config, ep *endpoint, run string, inprocess bool) *direct {
	d := &direct{cfg: cfg, ep: ep, run: run, procs: cfg.Runtimes, rt: make([]string, cfg.Credentials)}
	if inprocess {
		d.procs = min(cfg.Processes, cfg.Runtimes)
	}
	return d
}

func (d *direct) prepare(context.Context) error {
	for i := range d.rt {
		tok, err := d.ep.issue(d.run, i)
		if err != nil {
			return err
		}
		d.rt[i] = tok.RefreshToken
	}
	return nil
}

// process is one runtime process: a singleflight per credential, and the
// outcome of its refresh of this wave, which later runtimes of the process
// reuse instead of calling again.
type process struct {
	sf   singleflight.Group
	mu   sync.Mutex
	done map[int]bool
}

func (d *direct) wave(ctx context.Context, ws *waveState) error {
	k := d.cfg.Credentials
	procs := make([]*process, d.procs)
	for p := range procs {
		procs[p] = &process{done: map[int]bool{}}
	}
	var mu sync.Mutex
	next := make([]string, k) // the first new refresh token of each credential
	got := make([]bool, k)

	refresh := func(p *process, i int) {
		p.mu.Lock()
		_, seen := p.done[i]
		p.mu.Unlock()
		if seen {
			return // an earlier runtime of this process already has the new token
		}
		_, _, _ = p.sf.Do(strconv.Itoa(i), func() (any, error) {
			p.mu.Lock()
			_, seen := p.done[i]
			p.mu.Unlock()
			if seen {
				return nil, nil
			}
			tok, err := d.ep.refresh(ctx, i, d.rt[i])
			switch {
			case err == nil:
				mu.Lock()
				if !got[i] {
					got[i], next[i] = true, tok.RefreshToken
				}
				mu.Unlock()
				ws.settle(i, true)
			case permanentErr(err):
				ws.needsReauth.Add(1)
			default:
				ws.failed.Add(1)
			}
			p.mu.Lock()
			p.done[i] = err == nil
			p.mu.Unlock()
			return nil, nil
		})
	}

	// Runtime r of every credential, in turns: runtime 0 of all
	// credentials, then runtime 1, … with each runtime starting at another
	// credential, as runtimes do not see their 401s in the same order.
	var g errgroup.Group
	g.SetLimit(d.cfg.Publishers)
	for r := range d.cfg.Runtimes {
		p := procs[r%d.procs]
		for j := range k {
			i := (j + r*k/d.cfg.Runtimes) % k
			if ctx.Err() != nil {
				break
			}
			g.Go(func() error {
				ws.started(i)
				refresh(p, i)
				return nil
			})
		}
	}
	_ = g.Wait()
	for i := range k {
		if got[i] && next[i] != "" {
			d.rt[i] = next[i]
		}
		ws.settle(i, false) // no-op for the refreshed ones
	}
	return ctx.Err()
}

func (d *direct) probe(context.Context, int) (time.Duration, time.Duration, bool, error) {
	return 0, 0, false, errors.New("no probes without NATS")
}

func (d *direct) drain(context.Context, *waveState) (time.Duration, error) {
	return 0, errors.New("no backlog without NATS")
}

func (d *direct) close() {}

// permanentErr is the refresher's classification of a token-endpoint
// answer that no retry can fix (see workers/classify.go): an OAuth error code with
// 400/401/403, or another 4xx but 408 and 429.
func permanentErr(err error) bool {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.Response == nil {
		return false
	}
	switch s := re.Response.StatusCode; {
	case s == http.StatusBadRequest || s == http.StatusUnauthorized || s == http.StatusForbidden:
		return true
	case s == http.StatusRequestTimeout || s == http.StatusTooManyRequests:
		return false
	default:
		return s >= 400 && s < 500
	}
}
