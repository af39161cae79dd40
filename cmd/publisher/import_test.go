package main

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
)

// savedTokens copies testdata/import/<dir> into a temporary folder with the
// placeholders filled in: every file gets a fresh grant of the test
// authorization server. It returns the folder and the grant of each file
// that holds a token, by its path relative to the folder.
func (b *bundle) savedTokens(t *testing.T, dir string) (string, map[string]authtest.Tokens) {
	t.Helper()
	src := filepath.Join("testdata", "import", dir)
	dst := t.TempDir()
	grants := map[string]authtest.Tokens{}
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		tok := b.AS.Issue(fleet.ClientID)
		text := strings.NewReplacer(
			"$ACCESS", tok.AccessToken, "$REFRESH", tok.RefreshToken,
			"$CLIENT_ID", fleet.ClientID, "$CLIENT_SECRET", fleet.ClientSecret,
			"$ISSUER", b.AS.BaseURL(), "$EXPIRES_AT", time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
		).Replace(string(raw))
		if strings.Contains(string(raw), "$ACCESS") {
			grants[rel] = tok
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dst, rel)), 0o700); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), []byte(text), 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst, grants
}

// secretsOf lists every token and secret the saved files hold.
func secretsOf(grants map[string]authtest.Tokens) []string {
	s := []string{fleet.ClientSecret}
	for _, g := range grants {
		s = append(s, g.AccessToken, g.RefreshToken)
	}
	return s
}

// refreshEach reports a 401 for the imported token of each key and waits
// for its first refresh.
func (b *bundle) refreshEach(t *testing.T, imported map[string]authtest.Tokens) {
	t.Helper()
	for key, tok := range imported {
		k := fleet.MustKey(t, key)
		w := b.Watch(t, k)
		b.Publish401(t, k, events.Fingerprint(tok.AccessToken), "import-test", true)
		ev := w.WaitFor(t, "the first refresh of "+key, func(ev *events.Event) bool {
			return ev.NeedsReauth != nil || ev.Rotated != nil && ev.Rotated.Version == 2
		})
		if ev.NeedsReauth != nil {
			t.Errorf("%s: the first refresh ended in needs_reauth (%s: %s)", key, ev.NeedsReauth.Reason, ev.NeedsReauth.ErrorDescription)
		}
	}
	b.Settled(t)
}

// Done-when: a folder of saved tokens in every format is imported, all are
// registered, and the first refresh of each succeeds.
func TestImportFolderOfSavedTokens(t *testing.T) {
	t.Parallel()
	b := setup(t)
	written := time.Now()
	dir, grants := b.savedTokens(t, "good")
	args := []string{"import", "--key-template", "acme.{user}.{server}", "--user", "alice",
		"--token-endpoint", b.AS.TokenURL(), "--client-id", fleet.ClientID, "--client-secret", fleet.ClientSecret}

	// A dry run shows what would happen and registers nothing.
	r := b.publisher(t, "", append(args, "--dry-run", dir)...).want(t, 0)
	if n := strings.Count(r.out, "would register"); n != 5 {
		t.Errorf("dry run: %d lines say \"would register\", want 5:\n%s", n, r.out)
	}
	b.publisher(t, "", "token", "acme.alice.mcp-github-example").want(t, 3)

	r = b.publisher(t, "", append(args, dir)...).want(t, 0)
	want := map[string]string{ // key → file
		"acme.alice.mcp-github-example":               "python-storage/github.json",
		"acme.alice.5c3f0b9d6a1e4f2b8c7d9e0a1b2c3d4e": "mcp-remote/5c3f0b9d6a1e4f2b8c7d9e0a1b2c3d4e_tokens.json",
		"acme.alice.linear":                           "ts-sdk/linear_tokens.json",
		"acme.alice.https_mcp_notion_example":         "fastmcp/https_mcp_notion_example_tokens.json",
		"acme.alice.jira":                             "oauth2/jira.json",
	}
	imported := map[string]authtest.Tokens{}
	for key, file := range want {
		line := lineWith(r.out, filepath.Join(dir, file))
		if !strings.Contains(line, key) || !strings.Contains(line, "registered: version 1, fingerprint "+events.Fingerprint(grants[file].AccessToken)) {
			t.Errorf("%s: summary line %q, want it registered as %s", file, line, key)
		}
		imported[key] = grants[file]
		cred := b.Cred(t, fleet.MustKey(t, key))
		if cred.RefreshToken.Reveal() != grants[file].RefreshToken || cred.ClientID != fleet.ClientID {
			t.Errorf("%s: the stored credential lacks the saved refresh token or client", key)
		}
		// The files were saved with an expiry an hour after written (or
		// an hour's expires_in, counted at the import): an order, whatever
		// the load.
		if earliest, latest := written.Add(time.Hour).Truncate(time.Second), time.Now().Add(time.Hour); cred.ExpiresAt.Before(earliest) || cred.ExpiresAt.After(latest) {
			t.Errorf("%s: expires at %v, want the saved expiry, an hour after the files were written [%v, %v]", key, cred.ExpiresAt, earliest, latest)
		}
	}
	for _, format := range []string{"MCP Python SDK storage", "token + client information", "FastMCP token + client information", "x/oauth2 token"} {
		if !strings.Contains(r.out, format) {
			t.Errorf("the summary does not name the format %q:\n%s", format, r.out)
		}
	}
	mustNotContain(t, "import output", r.out+r.errOut, secretsOf(grants)...)

	b.refreshEach(t, imported)
	if n := b.AS.Calls(); n != len(want) {
		t.Errorf("token-endpoint calls = %d, want one first refresh per credential (%d)", n, len(want))
	}
	if n := b.AS.Reuses(); n != 0 {
		t.Errorf("refresh-token reuses = %d, want 0", n)
	}
	for _, c := range b.AS.CallLog() {
		if c.Status != 200 {
			t.Errorf("a first refresh was answered %d %s", c.Status, c.Error)
		}
		if c.Form.Get("resource") == "https://mcp.github.example/mcp" && c.Form.Get("scope") != "repo read:user" {
			t.Errorf("the refresh of the python-storage token asked for scope %q, want the saved \"repo read:user\"", c.Form.Get("scope"))
		}
	}
	if !slicesContainsFunc(b.AS.CallLog(), func(c authtest.Call) bool { return c.Form.Get("resource") == "https://mcp.github.example/mcp" }) {
		t.Error("no refresh sent the saved server URL as the resource")
	}
}

// A token saved with the authorization server it came from (the MCP
// TypeScript SDK's issuer) needs no endpoint flag: the refresher discovers
// the token endpoint.
func TestImportUsesTheSavedIssuer(t *testing.T) {
	t.Parallel()
	b := setup(t)
	dir, grants := b.savedTokens(t, "good/ts-sdk")
	r := b.publisher(t, "", "import", "--key-template", "acme.{user}.{name}", "--user", "bob", dir).want(t, 0)
	if !strings.Contains(r.out, "acme.bob.linear") || !strings.Contains(r.out, "registered") {
		t.Fatalf("import output:\n%s", r.out)
	}
	if got := b.Cred(t, fleet.MustKey(t, "acme.bob.linear")).TokenEndpoint; got != b.AS.TokenURL() {
		t.Errorf("stored token endpoint %q, want the discovered %q", got, b.AS.TokenURL())
	}
	b.refreshEach(t, map[string]authtest.Tokens{"acme.bob.linear": grants["linear_tokens.json"]})
}

// Files that cannot be imported are named with what is wrong, without a
// secret; the rest are imported all the same, and the exit status says
// that some failed.
func TestImportReportsEachBadFile(t *testing.T) {
	t.Parallel()
	b := setup(t)
	bad, badGrants := b.savedTokens(t, "broken")
	good, goodGrants := b.savedTokens(t, "good/oauth2")
	r := b.publisher(t, "", "import", "--key-template", "acme.carol.{name}", "--issuer", b.AS.BaseURL(),
		"--client-id", fleet.ClientID, "--client-secret", fleet.ClientSecret, bad, good, filepath.Join(bad, "missing.json")).want(t, 1)
	if !strings.Contains(lineWith(r.out, "jira.json"), "registered") {
		t.Errorf("the good file was not imported:\n%s", r.out)
	}
	for file, want := range map[string]string{
		"not-json.json":           "not a JSON object",
		"no-access-token.json":    "neither a token",
		"bad-expiry.json":         "expires_at",
		"wrong-type.json":         "refresh_token of type string",
		"orphan_client_info.json": "client information without tokens",
		"missing.json":            "no such file",
	} {
		if line := lineWith(r.errOut, filepath.Join(bad, file)); !strings.Contains(line, want) {
			t.Errorf("%s: stderr line %q, want it to say %q\nstderr:\n%s", file, line, want, r.errOut)
		}
	}
	if !strings.Contains(r.errOut, "6 of the files could not be imported") {
		t.Errorf("stderr does not count the failures:\n%s", r.errOut)
	}
	mustNotContain(t, "import output", r.out+r.errOut, append(secretsOf(badGrants), secretsOf(goodGrants)...)...)

	// Two files that the template gives the same key: the second is
	// refused, not registered over the first.
	twice, _ := b.savedTokens(t, "good/oauth2")
	r = b.publisher(t, "", "import", "--key-template", "acme.carol.{name}", "--issuer", b.AS.BaseURL(),
		"--client-id", fleet.ClientID, good, twice).want(t, 1)
	if !strings.Contains(r.errOut, "gives it the key acme.carol.jira, as it gives") {
		t.Errorf("a second file for the same key was not refused:\n%s", r.errOut)
	}

	// Bad flags are refused before any file is read.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"import", good}, "--key-template is required"},
		{[]string{"import", "--key-template", "acme.{who}.x", good}, "unknown placeholder {who}"},
		{[]string{"import", "--key-template", "acme.{user}", good}, "--key-template"},
		{[]string{"import", "--key-template", "acme.a.{name}"}, "give one or more files or folders"},
		{[]string{"import", "--key-template", "acme.a.{name}", "--server-url", "mcp.example", good}, "--server-url"},
	} {
		r := runCmd(t, context.Background(), "", append([]string{"--nats-url", "nats://127.0.0.1:1"}, tc.args...)...)
		if r.code != 2 || !strings.Contains(r.errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args, r.code, r.errOut, tc.want)
		}
	}
}

// lineWith returns the first line of s that contains sub.
func lineWith(s, sub string) string {
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			return line
		}
	}
	return fmt.Sprintf("(no line with %s)", sub)
}

func slicesContainsFunc[T any](s []T, f func(T) bool) bool {
	for _, v := range s {
		if f(v) {
			return true
		}
	}
	return false
}
