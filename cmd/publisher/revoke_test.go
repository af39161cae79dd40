package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/kv"
)

// sealKeyFile writes the fleet's seal key ring to a file, as the
// refreshers of a deployment share it.
func sealKeyFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "seal-keys.json")
	key := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)) // fleet.Setup's key k1
	if err := os.WriteFile(path, fmt.Appendf(nil, `{"active":"k1","keys":{"k1":%q}}`, key), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// refreshAt redeems a refresh token at the test server as the fleet's
// client, as a refresher would.
func refreshAt(b *bundle, rt string) error {
	cfg := oauth2.Config{ClientID: fleet.ClientID, ClientSecret: fleet.ClientSecret,
		Endpoint: oauth2.Endpoint{TokenURL: b.AS.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader}}
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, b.AS.Client())
	_, err := cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token()
	return err
}

func TestRevokeEndsTheGrantThenDeletes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	keys := sealKeyFile(t)
	const key = "acme.revoke.github"
	w := b.Watch(t, fleet.MustKey(t, key))
	b.register(t, key, b.AS.Issue(fleet.ClientID))
	cred := b.rotatesOnce(t, w, key, 2) // the stored tokens are the refresher's, not the login's

	r := b.publisher(t, "", "revoke", "--issuer", b.AS.BaseURL(), "--seal-key-file", keys, key).want(t, 0)
	want := "revoked " + key + " at " + b.AS.BaseURL() + "/revoke: the refresh token (its grant) and the access token\n" +
		"forgot " + key + ": removed the record and the pending refresh\n"
	if r.out != want {
		t.Errorf("revoke output:\n%s\nwant:\n%s", r.out, want)
	}
	mustNotContain(t, "revoke output", r.out+r.errOut, cred.RefreshToken.Reveal(), cred.AccessToken.Reveal(), fleet.ClientSecret)

	// The old refresh token fails at the authorization server, and so does
	// the access token; authbus forgot the credential.
	err := refreshAt(b, cred.RefreshToken.Reveal())
	if !strings.Contains(fmt.Sprint(err), "invalid_grant") || !strings.Contains(fmt.Sprint(err), "token revoked") {
		t.Errorf("refresh with the revoked refresh token: %v, want invalid_grant \"token revoked\"", err)
	}
	if b.AS.ValidAccessToken(cred.AccessToken.Reveal()) {
		t.Error("the access token is still valid at the authorization server")
	}
	log := b.AS.Revocations()
	if len(log) != 2 || log[0].TypeHint != "refresh_token" || log[0].Token != cred.RefreshToken.Reveal() ||
		log[1].TypeHint != "access_token" || log[0].ClientID != fleet.ClientID || log[0].Status != 200 || log[1].Status != 200 {
		t.Errorf("revocation calls %+v, want the refresh token, then the access token, as %s", log, fleet.ClientID)
	}
	b.publisher(t, "", "token", key).want(t, 3)
	b.publisher(t, "", "revoke", "--issuer", b.AS.BaseURL(), "--seal-key-file", keys, key).want(t, 3)
}

func TestRevokeWithoutRevocationEndpointOnlyDeletes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.AS.SetRevocation(false)
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, "acme.dex.github", tok)
	r := b.publisher(t, "", "revoke", "--issuer", b.AS.BaseURL(), "--seal-key-file", sealKeyFile(t), "--json", "acme.dex.github").want(t, 0)
	if !strings.Contains(r.errOut, "names no revocation endpoint") || !strings.Contains(r.errOut, "stay valid until they expire") {
		t.Errorf("stderr does not say that nothing was revoked:\n%s", r.errOut)
	}
	got := mustJSON[revokeResult](t, r.out)
	if got.RefreshTokenRevoked || got.AccessTokenRevoked || !got.Registered || got.RevocationEndpoint != "" {
		t.Errorf("revoke --json %+v", got)
	}
	b.publisher(t, "", "token", "acme.dex.github").want(t, 3)
	if err := refreshAt(b, tok.RefreshToken); err != nil {
		t.Errorf("nothing was revoked, yet the refresh token fails: %v", err)
	}
}

// A credential whose revocation does not happen is kept, so that revoke
// can be run again.
func TestRevokeKeepsWhatItCouldNotRevoke(t *testing.T) {
	t.Parallel()
	b := setup(t)
	keys := sealKeyFile(t)
	const key = "acme.keep.github"
	tok := b.AS.Issue(fleet.ClientID)
	b.register(t, key, tok)
	other := authtest.New(t) // another issuer, with another token endpoint

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--issuer", other.BaseURL()}, 2, "its token endpoint is " + b.AS.TokenURL()},
		{[]string{"--revocation-endpoint", "http://127.0.0.1:1/revoke"}, 1, "revoke the refresh token"},
		{[]string{"--issuer", b.AS.BaseURL(), "--seal-key-file", filepath.Join(t.TempDir(), "none.json")}, 2, "no key file at"},
		{[]string{}, 2, "give --issuer"},
		{[]string{"--issuer", b.AS.BaseURL(), "--revocation-endpoint", b.AS.BaseURL() + "/revoke"}, 2, "not both"},
		{[]string{"--revocation-endpoint", "http://192.0.2.1/revoke"}, 2, "not https"},
	} {
		args := append([]string{"revoke", "--seal-key-file", keys}, tc.args...)
		r := b.publisher(t, "", append(args, key)...)
		if r.code != tc.code || !strings.Contains(r.errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr:\n%s\nwant exit %d and %q", tc.args, r.code, r.errOut, tc.code, tc.want)
		}
		b.publisher(t, "", "token", key).want(t, 0)
	}

	// A refresh in flight holds the lease: revoke waits for it, up to
	// --timeout.
	leases, err := kv.OpenLeases(context.Background(), b.JS, b.Subj.LeasesBucket(), 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	lease, err := leases.Claim(context.Background(), fleet.MustKey(t, key), "a refresher", kv.Read{})
	if err != nil {
		t.Fatal(err)
	}
	r := b.publisher(t, "", "revoke", "--timeout", "300ms", "--issuer", b.AS.BaseURL(), "--seal-key-file", keys, key).want(t, 1)
	if !strings.Contains(r.errOut, "a refresh held the credential for all of --timeout") || len(b.AS.Revocations()) != 0 {
		t.Errorf("revoke while the lease is held: %s; %d revocations", r.errOut, len(b.AS.Revocations()))
	}
	if err := lease.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.publisher(t, "", "revoke", "--issuer", b.AS.BaseURL(), "--seal-key-file", keys, key).want(t, 0)
	if err := refreshAt(b, tok.RefreshToken); err == nil {
		t.Error("the refresh token still works after revoke")
	}
}
