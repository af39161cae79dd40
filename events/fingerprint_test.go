package events_test

import (
	"testing"

	"github.com/authbus/authbus/events"
)

func TestFingerprint(t *testing.T) {
	t.Parallel()
	// SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
	if got := events.Fingerprint("abc"); got != "ba7816bf8f01cfea" {
		t.Fatalf(`Fingerprint("abc") = %q, want "ba7816bf8f01cfea"`, got)
	}
	// SHA-256("") = e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
	if got := events.Fingerprint(""); got != "e3b0c44298fc1c14" {
		t.Fatalf(`Fingerprint("") = %q`, got)
	}
}

func TestValidFingerprint(t *testing.T) {
	t.Parallel()
	tests := map[string]bool{
		"0123456789abcdef":  true,
		"ba7816bf8f01cfea":  true,
		"0123456789ABCDEF":  false, // upper case
		"0123456789abcde":   false, // 15
		"0123456789abcdef0": false, // 17
		"0123456789abcdeg":  false,
		"":                  false,
	}
	for in, want := range tests {
		if got := events.ValidFingerprint(in); got != want {
			t.Errorf("ValidFingerprint(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestMsgID(t *testing.T) {
	t.Parallel()
	k := mustKey(t, "tenant.user.server")
	if got := events.MsgID(events.Type401, k, "0123456789abcdef"); got != "auth.401:tenant.user.server:0123456789abcdef" {
		t.Fatalf("MsgID = %q", got)
	}
	if got := events.MsgID(events.TypeExpiring, k, "0123456789abcdef"); got != "auth.expiring:tenant.user.server:0123456789abcdef" {
		t.Fatalf("MsgID = %q", got)
	}
}

func TestStatusCodes(t *testing.T) {
	t.Parallel()
	pairs := map[string]string{
		events.CodeInvalidRequest: "400",
		events.CodeForbidden:      "403",
		events.CodeNotFound:       "404",
		events.CodeNeedsReauth:    "409",
		events.CodeUnavailable:    "503",
	}
	for code, status := range pairs {
		if got := events.StatusOf(code); got != status {
			t.Errorf("StatusOf(%q) = %q, want %q", code, got, status)
		}
		if got := events.CodeOf(status); got != code {
			t.Errorf("CodeOf(%q) = %q, want %q", status, got, code)
		}
	}
	if got := events.CodeOf("500"); got != events.CodeUnavailable {
		t.Errorf(`CodeOf("500") = %q, want unavailable`, got)
	}
	if got := events.StatusOf("teapot"); got != "503" {
		t.Errorf(`StatusOf("teapot") = %q, want "503"`, got)
	}
}
