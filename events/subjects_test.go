package events_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/authbus/authbus/events"
)

func mustKey(t testing.TB, s string) events.Key {
	t.Helper()
	k, err := events.ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustSubjects(t testing.TB, prefix string) events.Subjects {
	t.Helper()
	s, err := events.NewSubjects(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestTypeWord(t *testing.T) {
	t.Parallel()
	for typ, word := range map[events.Type]string{
		events.Type401:         "401",
		events.TypeExpiring:    "expiring",
		events.TypeRotated:     "rotated",
		events.TypeNeedsReauth: "needs_reauth",
	} {
		if got := typ.Word(); got != word {
			t.Errorf("%s.Word() = %q, want %q", typ, got, word)
		}
		if !typ.Valid() {
			t.Errorf("%s.Valid() = false", typ)
		}
	}
	if events.Type("auth.token").Valid() {
		t.Error(`Type("auth.token").Valid() = true`)
	}
}

func TestSubjects(t *testing.T) {
	t.Parallel()
	k := mustKey(t, "acme.alice.github")
	tests := []struct {
		prefix string
		want   map[string]string
	}{
		{prefix: "", want: map[string]string{
			"Prefix":           "auth",
			"401":              "auth.401.acme.alice.github",
			"expiring":         "auth.expiring.acme.alice.github",
			"rotated":          "auth.rotated.acme.alice.github",
			"needs_reauth":     "auth.needs_reauth.acme.alice.github",
			"Token":            "auth.token.acme.alice.github",
			"Register":         "auth.register.acme.alice.github",
			"Schedule":         "auth.proactive.acme.alice.github",
			"LegacySchedule":   "auth.schedule.acme.alice.github",
			"Due":              "auth.due.expiring.acme.alice.github",
			"EventWildcard":    "auth.401.*.*.*",
			"TokenWildcard":    "auth.token.*.*.*",
			"RegisterWildcard": "auth.register.*.*.*",
			"ScheduleWildcard": "auth.proactive.*.*.*",
			"LegacyWildcard":   "auth.schedule.*.*.*",
			"DueWildcard":      "auth.due.expiring.*.*.*",
			"EventsStream":     "AUTH_EVENTS",
			"SchedulesStream":  "AUTH_SCHEDULES",
			"ReauthStream":     "AUTH_REAUTH",
			"Credentials":      "AUTH_CREDENTIALS",
			"Leases":           "AUTH_LEASES",
		}},
		{prefix: "acme.auth", want: map[string]string{
			"Prefix":           "acme.auth",
			"401":              "acme.auth.401.acme.alice.github",
			"expiring":         "acme.auth.expiring.acme.alice.github",
			"rotated":          "acme.auth.rotated.acme.alice.github",
			"needs_reauth":     "acme.auth.needs_reauth.acme.alice.github",
			"Token":            "acme.auth.token.acme.alice.github",
			"Register":         "acme.auth.register.acme.alice.github",
			"Schedule":         "acme.auth.proactive.acme.alice.github",
			"LegacySchedule":   "acme.auth.schedule.acme.alice.github",
			"Due":              "acme.auth.due.expiring.acme.alice.github",
			"EventWildcard":    "acme.auth.401.*.*.*",
			"TokenWildcard":    "acme.auth.token.*.*.*",
			"RegisterWildcard": "acme.auth.register.*.*.*",
			"ScheduleWildcard": "acme.auth.proactive.*.*.*",
			"LegacyWildcard":   "acme.auth.schedule.*.*.*",
			"DueWildcard":      "acme.auth.due.expiring.*.*.*",
			"EventsStream":     "ACME_AUTH_EVENTS",
			"SchedulesStream":  "ACME_AUTH_SCHEDULES",
			"ReauthStream":     "ACME_AUTH_REAUTH",
			"Credentials":      "ACME_AUTH_CREDENTIALS",
			"Leases":           "ACME_AUTH_LEASES",
		}},
	}
	for _, tt := range tests {
		t.Run("prefix="+tt.prefix, func(t *testing.T) {
			t.Parallel()
			s := mustSubjects(t, tt.prefix)
			got := map[string]string{
				"Prefix":           s.Prefix(),
				"401":              s.Event(events.Type401, k),
				"expiring":         s.Event(events.TypeExpiring, k),
				"rotated":          s.Event(events.TypeRotated, k),
				"needs_reauth":     s.Event(events.TypeNeedsReauth, k),
				"Token":            s.Token(k),
				"Register":         s.Register(k),
				"Schedule":         s.Schedule(k),
				"LegacySchedule":   s.LegacySchedule(k),
				"Due":              s.Due(events.TypeExpiring, k),
				"EventWildcard":    s.EventWildcard(events.Type401),
				"TokenWildcard":    s.TokenWildcard(),
				"RegisterWildcard": s.RegisterWildcard(),
				"ScheduleWildcard": s.ScheduleWildcard(),
				"LegacyWildcard":   s.LegacyScheduleWildcard(),
				"DueWildcard":      s.DueWildcard(events.TypeExpiring),
				"EventsStream":     s.EventsStream(),
				"SchedulesStream":  s.SchedulesStream(),
				"ReauthStream":     s.ReauthStream(),
				"Credentials":      s.CredentialsBucket(),
				"Leases":           s.LeasesBucket(),
			}
			for name, want := range tt.want {
				if got[name] != want {
					t.Errorf("%s = %q, want %q", name, got[name], want)
				}
			}
			// Every built subject parses back to its word and key.
			for _, typ := range []events.Type{events.Type401, events.TypeExpiring, events.TypeRotated, events.TypeNeedsReauth} {
				gotType, gotKey, err := s.ParseEvent(s.Event(typ, k))
				if err != nil || gotType != typ || gotKey != k {
					t.Errorf("ParseEvent(Event(%s)) = %s, %v, %v", typ, gotType, gotKey, err)
				}
			}
			for word, subj := range map[string]string{"token": s.Token(k), "register": s.Register(k), "proactive": s.Schedule(k), "schedule": s.LegacySchedule(k)} {
				gotWord, gotKey, err := s.Parse(subj)
				if err != nil || gotWord != word || gotKey != k {
					t.Errorf("Parse(%q) = %q, %v, %v", subj, gotWord, gotKey, err)
				}
			}
			// A fired schedule is work like the lanes' events.
			for _, subj := range []string{s.Work(events.TypeExpiring, k), s.Slow(events.TypeExpiring, k), s.Due(events.TypeExpiring, k)} {
				gotType, gotKey, err := s.ParseWork(subj)
				if err != nil || gotType != events.TypeExpiring || gotKey != k {
					t.Errorf("ParseWork(%q) = %s, %v, %v", subj, gotType, gotKey, err)
				}
			}
		})
	}
}

func TestZeroSubjectsUsesDefaultPrefix(t *testing.T) {
	t.Parallel()
	var s events.Subjects
	if got := s.Token(mustKey(t, "a.b.c")); got != "auth.token.a.b.c" {
		t.Fatalf("zero Subjects Token = %q", got)
	}
}

func TestNewSubjectsRefuses(t *testing.T) {
	t.Parallel()
	for _, prefix := range []string{".", "auth.", ".auth", "a..b", "auth.*", "auth.>", "au th", "$auth"} {
		t.Run(prefix, func(t *testing.T) {
			t.Parallel()
			_, err := events.NewSubjects(prefix)
			if !errors.Is(err, events.ErrInvalidSubject) || !strings.Contains(err.Error(), "prefix") {
				t.Fatalf("NewSubjects(%q) = %v, want ErrInvalidSubject naming the prefix", prefix, err)
			}
		})
	}
}

func TestSubjectsParseRefuses(t *testing.T) {
	t.Parallel()
	s := mustSubjects(t, "acme.auth")
	tests := []struct {
		name    string
		subject string
		event   bool // use ParseEvent
		wantErr string
		wantKey bool // the error also wraps ErrInvalidKey
	}{
		{name: "other prefix", subject: "auth.401.a.b.c", wantErr: `does not start with "acme.auth."`},
		{name: "prefix only", subject: "acme.auth", wantErr: "does not start with"},
		{name: "no key", subject: "acme.auth.401", wantErr: "has no credential key"},
		{name: "empty word", subject: "acme.auth..a.b.c", wantErr: "the word after the prefix is empty"},
		{name: "bad word", subject: "acme.auth.*.a.b.c", wantErr: "the word after the prefix has the character '*'"},
		{name: "wildcard key", subject: "acme.auth.401.*.*.*", wantErr: "tenant (part 1) has the character '*'", wantKey: true},
		{name: "short key", subject: "acme.auth.401.a.b", wantErr: "has 2 parts", wantKey: true},
		{name: "long key", subject: "acme.auth.401.a.b.c.d", wantErr: "has 4 parts", wantKey: true},
		{name: "not an event word", subject: "acme.auth.token.a.b.c", event: true, wantErr: `"token" is not an event word`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var err error
			if tt.event {
				_, _, err = s.ParseEvent(tt.subject)
			} else {
				_, _, err = s.Parse(tt.subject)
			}
			if !errors.Is(err, events.ErrInvalidSubject) {
				t.Fatalf("error = %v, want ErrInvalidSubject", err)
			}
			if errors.Is(err, events.ErrInvalidKey) != tt.wantKey {
				t.Fatalf("errors.Is(err, ErrInvalidKey) = %v, want %v", !tt.wantKey, tt.wantKey)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}
