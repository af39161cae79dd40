package soak

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/authbus/authbus/workers"
	"github.com/authbus/authbus/workers/egress"
)

// slot is one refresher of the soak, through its restarts: a process
// started from Config.Refresher, or a pool in this process.
type slot struct {
	s       *soak
	name    string
	keyFile string

	mu    sync.Mutex
	n     int // incarnations started
	kills int
	// A process.
	cmd  *exec.Cmd
	done chan error
	// A pool in this process.
	nc     *nats.Conn
	cancel context.CancelFunc
	ran    chan error
	dying  sync.WaitGroup // killed pools whose Run has not returned yet
	// The processes that ended: CPU and peak memory.
	ended []usage
	// What the current process had used when the runtimes started.
	base usage
}

// usage is what one refresher process used.
type usage struct {
	cpu  time.Duration
	peak int64 // bytes, VmHWM
}

// start starts a new incarnation.
func (sl *slot) start(ctx context.Context) error {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	sl.n++
	instance := fmt.Sprintf("%s-%d", sl.name, sl.n)
	sink := &logSink{c: sl.s.stats, out: sl.s.cfg.Log, since: sl.s.since}
	cfg := sl.s.cfg
	if cfg.Refresher == "" {
		nc, err := nats.Connect(sl.s.srv.url, nats.Name("authbus-soak-"+instance), nats.MaxReconnects(-1))
		if err != nil {
			return fmt.Errorf("soak: %s: connect: %w", instance, err)
		}
		pool, err := workers.New(ctx, nc, workers.Config{
			Prefix:      cfg.Prefix,
			Workers:     cfg.Workers,
			RefreshLead: cfg.RefreshLead,
			Instance:    instance,
			Seal:        sl.s.ring,
			// The authorization server listens on 127.0.0.1.
			TokenHosts: egress.Policy{AllowLoopback: true},
			Logger:     slog.New(slog.NewJSONHandler(sink, nil)),
		})
		if err != nil {
			nc.Close()
			return fmt.Errorf("soak: %s: %w", instance, err)
		}
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		sl.nc, sl.cancel, sl.ran = nc, cancel, make(chan error, 1)
		go func(ran chan error) { ran <- pool.Run(pctx) }(sl.ran)
		return nil
	}
	args := []string{"--nats-url", sl.s.srv.url, "--seal-key-file", sl.keyFile, "--allow-loopback-token-hosts",
		"--prefix", cfg.Prefix, "--instance", instance, "--metrics-addr", "", "--log-format", "json", "--log-level", "info"}
	if cfg.Workers > 0 {
		args = append(args, "--workers", strconv.Itoa(cfg.Workers))
	}
	if cfg.RefreshLead > 0 {
		args = append(args, "--refresh-lead", cfg.RefreshLead.String())
	}
	args = append(args, cfg.RefresherArgs...)
	cmd := exec.Command(cfg.Refresher, args...)
	cmd.Stderr = sink
	// Only what the refresher is told: no OTEL_* exporter of the caller.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("soak: start %s: %w", cfg.Refresher, err)
	}
	sl.cmd, sl.done = cmd, make(chan error, 1)
	go func(done chan error) { done <- cmd.Wait() }(sl.done)
	return nil
}

// kill ends the current incarnation the hard way (SIGKILL, or a closed
// connection for a pool) and starts the next.
func (sl *slot) kill(ctx context.Context) error {
	sl.mu.Lock()
	if sl.cmd != nil {
		u := procUsage(sl.cmd.Process.Pid)
		_ = sl.cmd.Process.Signal(syscall.SIGKILL)
		<-sl.done
		sl.ended = append(sl.ended, u.minus(sl.base))
		sl.base, sl.cmd = usage{}, nil
	} else if sl.nc != nil {
		// In-flight refreshes find the connection gone, as in a crash. The
		// pool's Run may wait for them (a schedule's publish ack times out
		// after 10s): the next incarnation does not wait for it, stop does.
		sl.nc.Close()
		sl.cancel()
		sl.dying.Go(func(ran chan error) func() { return func() { <-ran } }(sl.ran))
		sl.nc = nil
	}
	sl.kills++
	sl.mu.Unlock()
	sl.s.progress("%s killed; starting it again", sl.name)
	return sl.start(ctx)
}

// markStart records what the current process had used when the runtimes
// started, so that its usage counts the soak alone.
func (sl *slot) markStart() {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.cmd != nil {
		sl.base = procUsage(sl.cmd.Process.Pid)
		sl.base.peak = 0
	}
}

// usage returns the CPU and the peak memory of every incarnation so far,
// the current one included.
func (sl *slot) usage() (cpu time.Duration, peak int64, incarnations int) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	all := sl.ended
	if sl.cmd != nil {
		all = append(all[:len(all):len(all)], procUsage(sl.cmd.Process.Pid).minus(sl.base))
	}
	for _, u := range all {
		cpu += u.cpu
		peak = max(peak, u.peak)
	}
	return cpu, peak, sl.n
}

// stop ends the current incarnation gracefully (SIGTERM, or a cancelled
// pool) and waits for it.
func (sl *slot) stop() {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.cmd != nil {
		_ = sl.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-sl.done:
		case <-time.After(time.Minute):
			_ = sl.cmd.Process.Kill()
			<-sl.done
		}
		sl.cmd = nil
	}
	if sl.nc != nil {
		sl.cancel()
		<-sl.ran
		_ = sl.nc.Drain()
		sl.nc = nil
	}
	sl.dying.Wait()
}

func (u usage) minus(base usage) usage { return usage{cpu: u.cpu - base.cpu, peak: u.peak} }

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// procUsage reads a process's CPU time and peak resident memory from
// /proc; zero where it cannot (not Linux).
func procUsage(pid int) usage {
	var u usage
	if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// Fields after the command name, which is in parentheses and may
		// hold spaces: state is field 3, utime 14, stime 15.
		if i := bytes.LastIndexByte(stat, ')'); i >= 0 {
			f := bytes.Fields(stat[i+1:])
			if len(f) > 12 {
				ut, _ := strconv.ParseInt(string(f[11]), 10, 64)
				st, _ := strconv.ParseInt(string(f[12]), 10, 64)
				u.cpu = time.Duration(ut+st) * time.Second / clockTicks
			}
		}
	}
	if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, line := range bytes.Split(status, []byte("\n")) {
			if f := bytes.Fields(line); len(f) >= 2 && string(f[0]) == "VmHWM:" {
				kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
				u.peak = kb << 10
			}
		}
	}
	return u
}

// selfUsage is procUsage of this process.
func selfUsage() usage { return procUsage(os.Getpid()) }
