package authtest

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestSetMetadataServesOnlyChosenDocuments(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name                string
		oauth, openid       bool
		wantOAuth, wantOIDC int
	}{
		{"both", true, true, 200, 200},
		{"openid only", false, true, 404, 200},
		{"oauth only", true, false, 200, 404},
		{"none", false, false, 404, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			b.srv.SetMetadata(tc.oauth, tc.openid)
			for path, want := range map[string]int{MetadataPath: tc.wantOAuth, OpenIDConfigurationPath: tc.wantOIDC} {
				resp, err := b.srv.Client().Get(b.srv.BaseURL() + path)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != want {
					t.Errorf("%s: HTTP %d, want %d", path, resp.StatusCode, want)
				}
			}
			if got := b.srv.MetadataCalls(); got != 2 {
				t.Errorf("MetadataCalls = %d, want 2 (served and refused alike)", got)
			}
			if b.srv.Calls() != 0 {
				t.Errorf("metadata requests counted as token calls: %d", b.srv.Calls())
			}
		})
	}
}

func TestMetadata(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, path := range []string{"/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"} {
		resp, err := b.srv.Client().Get(b.srv.BaseURL() + path)
		if err != nil {
			t.Fatal(err)
		}
		var md struct {
			Issuer        string   `json:"issuer"`
			TokenEndpoint string   `json:"token_endpoint"`
			AuthMethods   []string `json:"token_endpoint_auth_methods_supported"`
			GrantTypes    []string `json:"grant_types_supported"`
		}
		err = json.NewDecoder(resp.Body).Decode(&md)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %d %v", path, resp.StatusCode, err)
		}
		if md.Issuer != b.srv.BaseURL() || md.TokenEndpoint != b.srv.TokenURL() ||
			strings.Join(md.AuthMethods, " ") != "client_secret_basic client_secret_post" ||
			strings.Join(md.GrantTypes, " ") != "authorization_code refresh_token client_credentials urn:ietf:params:oauth:grant-type:device_code" {
			t.Errorf("%s: %+v", path, md)
		}
	}
	if b.srv.Calls() != 0 {
		t.Errorf("metadata requests counted as token calls: %d", b.srv.Calls())
	}
}
