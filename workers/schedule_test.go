package workers

import (
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/kv"
)

func TestScheduleAt(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 300e6, time.UTC)
	hour := &kv.Credential{ReceivedAt: now, ExpiresAt: now.Add(time.Hour)}
	l := events.Lead(time.Hour) // 6m
	for _, tc := range []struct {
		name     string
		c        *kv.Credential
		r        float64
		from, to time.Time // inclusive bounds
	}{
		{"start of the window", hour, 0, now.Add(time.Hour - l), now.Add(time.Hour - l + time.Second)},
		{"end of the window", hour, 0.999, now.Add(time.Hour - l/2 - time.Second), now.Add(time.Hour - l/2 + time.Second)},
		{"already expired", &kv.Credential{ReceivedAt: now.Add(-time.Hour), ExpiresAt: now.Add(-time.Minute)}, 0.5,
			now.Add(time.Second).Truncate(time.Second), now.Add(time.Second).Truncate(time.Second)},
	} {
		at := scheduleAt(tc.c, events.Lead(tc.c.ExpiresAt.Sub(tc.c.ReceivedAt)), now, tc.r)
		if at.Before(tc.from) || at.After(tc.to) {
			t.Errorf("%s: at %s, want within [%s, %s]", tc.name, at.Format(time.TimeOnly), tc.from.Format(time.TimeOnly), tc.to.Format(time.TimeOnly))
		}
		if at.Nanosecond() != 0 {
			t.Errorf("%s: at %s is not a whole second", tc.name, at)
		}
		// Rounding up keeps the refresh due when it arrives.
		if due := tc.c.ExpiresAt.Add(-events.Lead(tc.c.ExpiresAt.Sub(tc.c.ReceivedAt))); at.Before(due) {
			t.Errorf("%s: fires at %s, before it is due at %s", tc.name, at, due)
		}
	}
}

func TestRefreshLeadOverride(t *testing.T) {
	p := &Pool{cfg: Config{RefreshLead: 2 * time.Minute}}
	now := time.Now()
	if got := p.lead(&kv.Credential{ReceivedAt: now, ExpiresAt: now.Add(time.Hour)}); got != 2*time.Minute {
		t.Errorf("lead = %v, want the configured 2m", got)
	}
	if got := p.lead(&kv.Credential{ReceivedAt: now, ExpiresAt: now.Add(time.Minute)}); got != 30*time.Second {
		t.Errorf("lead = %v, want half of a 1m lifetime", got)
	}
}
