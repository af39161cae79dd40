package storm

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Spread is the minimum, mean and maximum of a count.
type Spread struct {
	Min  int     `json:"min"`
	Mean float64 `json:"mean"`
	Max  int     `json:"max"`
}

func spreadOf(xs []int) Spread {
	if len(xs) == 0 {
		return Spread{}
	}
	s := Spread{Min: xs[0], Max: xs[0]}
	sum := 0
	for _, x := range xs {
		s.Min, s.Max = min(s.Min, x), max(s.Max, x)
		sum += x
	}
	s.Mean = float64(sum) / float64(len(xs))
	return s
}

// Latency summarises durations, in milliseconds for JSON.
type Latency struct {
	N     int     `json:"n"`
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

func latencyOf(ds []time.Duration) Latency {
	if len(ds) == 0 {
		return Latency{}
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	// Nearest rank: the smallest value at or above the share asked for.
	rank := func(p int) time.Duration { return ds[max(0, (len(ds)*p+99)/100-1)] }
	return Latency{N: len(ds), P50Ms: ms(rank(50)), P99Ms: ms(rank(99)), MaxMs: ms(ds[len(ds)-1])}
}

// ModeResult is what one mode's storm came to.
type ModeResult struct {
	Mode Mode `json:"mode"`
	// Calls is the number of token-endpoint calls.
	Calls int `json:"token_calls"`
	// CallsPerGeneration counts calls per credential per wave (a wave is one
	// generation of every credential's token).
	CallsPerGeneration Spread `json:"calls_per_generation"`
	// PerGenerationExact is false when only the mean is known (a real
	// endpoint cannot say which credential a call was for).
	PerGenerationExact bool `json:"calls_per_generation_exact"`
	// Reuses of spent refresh tokens, as the server counted them; -1 when
	// unknown.
	Reuses int `json:"refresh_token_reuses"`
	// NeedsReauth counts what would send a person back to log in: a
	// runtime (naive), a process (inprocess) or a credential (authbus,
	// ceiling) that got a permanent error.
	NeedsReauth int `json:"needs_reauth"`
	// Failed counts refreshes that failed transiently and were given up
	// (naive and inprocess do not retry; authbus and ceiling retry).
	Failed int `json:"failed"`
	// Unrefreshed counts credential generations that never got a new token
	// within the wave.
	Unrefreshed int `json:"unrefreshed"`
	// Latency is from a credential's first 401 of a wave to its new token.
	Latency Latency `json:"latency_401_to_rotated"`
	// Events is the number of 401s the runtimes reported.
	Events int `json:"events"`
	// Seconds is the wall time of all waves, set-up excluded.
	Seconds float64 `json:"seconds"`
	// EventsPerSec and RefreshesPerSec are Events and credential
	// generations over Seconds.
	EventsPerSec    float64 `json:"events_per_sec"`
	RefreshesPerSec float64 `json:"refreshes_per_sec"`
	// BacklogRefreshesPerSec is how fast the refreshers work off a backlog
	// of one 401 per credential, published while they were paused (authbus
	// and ceiling): the refresh pipeline alone, without publishing going
	// on at the same time. It is the throughput compared with the ceiling.
	BacklogRefreshesPerSec float64 `json:"backlog_refreshes_per_sec,omitempty"`
	// PeakCallsPerSec is the most token calls that arrived within any one
	// second.
	PeakCallsPerSec int `json:"token_calls_per_sec_peak"`
	// Probe is the latency of one-at-a-time refreshes after the waves
	// (authbus and ceiling), and ProbeAdded the same less the endpoint's
	// own time for each call; ProbeAdded is empty when the calls were made
	// elsewhere (an external deployment).
	Probe      *Latency `json:"probe_latency,omitempty"`
	ProbeAdded *Latency `json:"probe_added_latency,omitempty"`
	// OfCeiling is authbus's BacklogRefreshesPerSec as a percentage of the
	// ceiling's, when both ran.
	OfCeiling float64 `json:"percent_of_ceiling,omitempty"`
}

// Report is the result of a storm.
type Report struct {
	Credentials int           `json:"credentials"`
	Runtimes    int           `json:"runtimes_per_credential"`
	Waves       int           `json:"waves"`
	Processes   int           `json:"processes"`
	Pools       int           `json:"pools"`
	Workers     int           `json:"workers_per_pool"`
	Endpoint    string        `json:"endpoint"`
	NATS        string        `json:"nats"`
	Modes       []*ModeResult `json:"modes"`
}

// Mode returns the result of mode m, or nil.
func (r *Report) Mode(m Mode) *ModeResult {
	for _, x := range r.Modes {
		if x.Mode == m {
			return x
		}
	}
	return nil
}

// WriteTable writes the side-by-side summary: one column per mode.
func (r *Report) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "storm: %d credentials × %d runtimes × %d waves; endpoint %s; NATS %s; %d pools × %d workers; inprocess P=%d\n\n",
		r.Credentials, r.Runtimes, r.Waves, r.Endpoint, r.NATS, r.Pools, r.Workers, r.Processes)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(m *ModeResult) string) {
		cells := []string{name}
		for _, m := range r.Modes {
			cells = append(cells, f(m))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t")+"\t")
	}
	ms := func(v float64) string { return fmt.Sprintf("%.1f ms", v) }
	row("", func(m *ModeResult) string { return string(m.Mode) })
	row("token-endpoint calls", func(m *ModeResult) string { return fmt.Sprint(m.Calls) })
	row("calls/generation min/mean/max", func(m *ModeResult) string {
		if !m.PerGenerationExact {
			return fmt.Sprintf("?/%.2f/?", m.CallsPerGeneration.Mean)
		}
		return fmt.Sprintf("%d/%.2f/%d", m.CallsPerGeneration.Min, m.CallsPerGeneration.Mean, m.CallsPerGeneration.Max)
	})
	row("refresh-token reuses", func(m *ModeResult) string {
		if m.Reuses < 0 {
			return "n/a"
		}
		return fmt.Sprint(m.Reuses)
	})
	row("needs_reauth", func(m *ModeResult) string { return fmt.Sprint(m.NeedsReauth) })
	row("failed (transient, given up)", func(m *ModeResult) string { return fmt.Sprint(m.Failed) })
	row("generations not refreshed", func(m *ModeResult) string { return fmt.Sprint(m.Unrefreshed) })
	row("401→new token p50", func(m *ModeResult) string { return ms(m.Latency.P50Ms) })
	row("401→new token p99", func(m *ModeResult) string { return ms(m.Latency.P99Ms) })
	row("401→new token max", func(m *ModeResult) string { return ms(m.Latency.MaxMs) })
	row("events/s", func(m *ModeResult) string { return fmt.Sprintf("%.0f", m.EventsPerSec) })
	row("refreshes/s", func(m *ModeResult) string { return fmt.Sprintf("%.0f", m.RefreshesPerSec) })
	row("token calls/s peak (1 s)", func(m *ModeResult) string { return fmt.Sprint(m.PeakCallsPerSec) })
	row("backlog refreshes/s", func(m *ModeResult) string {
		if m.BacklogRefreshesPerSec == 0 {
			return "-"
		}
		return fmt.Sprintf("%.0f", m.BacklogRefreshesPerSec)
	})
	row("% of ceiling (backlog)", func(m *ModeResult) string {
		if m.OfCeiling == 0 {
			return "-"
		}
		return fmt.Sprintf("%.0f %%", m.OfCeiling)
	})
	row("probe 401→new token p50/p99", func(m *ModeResult) string {
		if m.Probe == nil {
			return "-"
		}
		return fmt.Sprintf("%.2f/%.2f ms", m.Probe.P50Ms, m.Probe.P99Ms)
	})
	row("probe added p50/p99", func(m *ModeResult) string {
		if m.ProbeAdded == nil {
			return "-"
		}
		return fmt.Sprintf("%.2f/%.2f ms", m.ProbeAdded.P50Ms, m.ProbeAdded.P99Ms)
	})
	return tw.Flush()
}

// peakPerSecond is the most of ts within any one-second window.
func peakPerSecond(ts []time.Time) int {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	best, lo := 0, 0
	for hi := range ts {
		for ts[hi].Sub(ts[lo]) >= time.Second {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}
