package events_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/authbus/authbus/events"
)

func TestParseKey(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("a", events.MaxKeyPartLen)
	tests := []struct {
		name    string
		in      string
		want    events.Key
		wantErr string // substring of the error; "" means success
	}{
		{name: "good", in: "acme.alice.github", want: events.Key{Tenant: "acme", User: "alice", Server: "github"}},
		{name: "all allowed characters", in: "A-z_0.9-b.c_D", want: events.Key{Tenant: "A-z_0", User: "9-b", Server: "c_D"}},
		{name: "parts of maximal length", in: long + "." + long + "." + long, want: events.Key{Tenant: long, User: long, Server: long}},
		{name: "empty", in: "", wantErr: "has 1 parts, want 3"},
		{name: "empty tenant", in: ".alice.github", wantErr: "tenant (part 1) is empty"},
		{name: "empty user", in: "acme..github", wantErr: "user (part 2) is empty"},
		{name: "empty server", in: "acme.alice.", wantErr: "server (part 3) is empty"},
		{name: "too long", in: "acme." + long + "b.github", wantErr: "user (part 2) is 65 characters long, at most 64"},
		{name: "bad character", in: "acme.al*ce.github", wantErr: "user (part 2) has the character '*' at offset 2"},
		{name: "space", in: "acme.alice.git hub", wantErr: "server (part 3) has the character ' '"},
		{name: "non-ASCII", in: "acme.aliçe.github", wantErr: "has the character 'ç' at offset 3"},
		{name: "invalid UTF-8", in: "acme.al\xffce.github", wantErr: "has the byte 0xff (not UTF-8) at offset 2"},
		{name: "wildcard", in: "acme.>.github", wantErr: "has the character '>'"},
		{name: "2 parts", in: "acme.alice", wantErr: "has 2 parts, want 3"},
		{name: "4 parts", in: "acme.alice.github.extra", wantErr: "has 4 parts, want 3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := events.ParseKey(tt.in)
			if tt.wantErr != "" {
				if !errors.Is(err, events.ErrInvalidKey) {
					t.Fatalf("ParseKey(%q) error = %v, want ErrInvalidKey", tt.in, err)
				}
				if !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "tenant.user.server") {
					t.Fatalf("ParseKey(%q) error = %q, want it to contain %q and the key format", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseKey(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseKey(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if got.String() != tt.in {
				t.Fatalf("String() = %q, want %q", got.String(), tt.in)
			}
		})
	}
}

func TestNewKey(t *testing.T) {
	t.Parallel()
	if _, err := events.NewKey("acme", "alice", "github"); err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	// A dot inside a part would shift every part of the subject.
	_, err := events.NewKey("acme", "alice.bob", "github")
	if !errors.Is(err, events.ErrInvalidKey) || !strings.Contains(err.Error(), "user (part 2)") {
		t.Fatalf("NewKey with a dot in user: %v", err)
	}
	if err := (events.Key{}).Validate(); !errors.Is(err, events.ErrInvalidKey) {
		t.Fatalf("zero Key Validate() = %v, want ErrInvalidKey", err)
	}
}

func TestKeyErrorIsBounded(t *testing.T) {
	t.Parallel()
	_, err := events.ParseKey(strings.Repeat("x", 1<<20))
	if err == nil || len(err.Error()) > 400 {
		t.Fatalf("error for a 1 MiB key is %d bytes, want a short one", len(err.Error()))
	}
}

func TestKeyText(t *testing.T) {
	t.Parallel()
	k := events.Key{Tenant: "acme", User: "alice", Server: "github"}
	b, err := json.Marshal(map[string]events.Key{"key": k})
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"key":"acme.alice.github"}` {
		t.Fatalf("json = %s", b)
	}
	var back map[string]events.Key
	if err := json.Unmarshal(b, &back); err != nil || back["key"] != k {
		t.Fatalf("round trip = %+v, %v", back, err)
	}
	if err := json.Unmarshal([]byte(`{"key":"acme..github"}`), &back); !errors.Is(err, events.ErrInvalidKey) {
		t.Fatalf("unmarshal bad key: %v, want ErrInvalidKey", err)
	}
}
