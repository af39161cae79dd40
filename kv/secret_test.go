package kv

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestSecretRedacted(t *testing.T) {
	t.Parallel()
	const plain = "rt-very-secret"
	s := Secret(plain)
	holder := struct {
		Name  string
		Token Secret
		Ptr   *Secret
	}{"alice", s, &s}

	if s.Reveal() != plain || s.IsZero() || !Secret("").IsZero() {
		t.Fatal("Reveal/IsZero")
	}

	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%10s"} {
		for name, v := range map[string]any{"secret": s, "struct": holder, "pointer": &s} {
			got := fmt.Sprintf(verb, v)
			if strings.Contains(got, plain) || strings.Contains(got, fmt.Sprintf("%x", plain)) {
				t.Errorf("Sprintf(%s, %s) = %s: leaks the secret", verb, name, got)
			}
		}
		if got := fmt.Sprintf(verb, s); got != redacted {
			t.Errorf("Sprintf(%s, secret) = %q, want %q", verb, got, redacted)
		}
	}
	if got := fmt.Sprint(s) + s.String() + s.GoString(); got != strings.Repeat(redacted, 3) {
		t.Errorf("Sprint/String/GoString = %q", got)
	}

	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("refresh", "rt", s, "holder", holder, slog.Any("ptr", &s), slog.Group("g", "rt", s))
	slog.New(slog.NewTextHandler(&buf, nil)).Info("refresh", "rt", s, "holder", holder)
	if strings.Contains(buf.String(), plain) || !strings.Contains(buf.String(), `"rt":"[redacted]"`) {
		t.Errorf("slog output leaks or lacks the redaction:\n%s", buf.String())
	}

	b, err := json.Marshal(holder)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"Name":"alice","Token":"[redacted]","Ptr":"[redacted]"}`; string(b) != want {
		t.Errorf("json.Marshal = %s, want %s", b, want)
	}
}
