package events_test

import (
	"testing"
	"time"

	"github.com/authbus/authbus/events"
)

func TestLead(t *testing.T) {
	for _, tc := range []struct{ lifetime, want time.Duration }{
		{4 * time.Second, 2 * time.Second},   // half the lifetime
		{20 * time.Second, 10 * time.Second}, // floor, but ≤ half
		{90 * time.Second, 30 * time.Second}, // the 30s floor
		{10 * time.Minute, 60 * time.Second}, // 10 %
		{time.Hour, 6 * time.Minute},         // 10 %
		{24 * time.Hour, 10 * time.Minute},   // the 10m cap
		{0, 0},
	} {
		if got := events.Lead(tc.lifetime); got != tc.want {
			t.Errorf("Lead(%v) = %v, want %v", tc.lifetime, got, tc.want)
		}
	}
}
