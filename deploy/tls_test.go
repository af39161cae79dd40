package deploy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"math/big"
	"os"
	"testing"
	"time"
)

// The demo authorization server (Dex) must be reached over https: the
// refreshers refuse plain http to anything but loopback. Its certificate and
// the CA the refreshers trust are committed, made by this file:
//
//	go test ./deploy -run TestDemoTLS -update-demo-tls
//
// They protect nothing but the demo; never reuse them.
var updateDemoTLS = flag.Bool("update-demo-tls", false, "write new demo CA and Dex certificate under deploy/dex/tls")

const (
	demoCAFile   = "dex/tls/ca.crt"
	demoCertFile = "dex/tls/dex.crt"
	demoKeyFile  = "dex/tls/dex.key"
	demoTLSHost  = "dex" // the compose service name, the issuer's host
)

func TestDemoTLS(t *testing.T) {
	if *updateDemoTLS {
		writeDemoTLS(t)
	}
	caPEM, err := os.ReadFile(demoCAFile)
	if err != nil {
		t.Fatalf("%v; run: go test ./deploy -run TestDemoTLS -update-demo-tls", err)
	}
	pair, err := tls.LoadX509KeyPair(demoCertFile, demoKeyFile)
	if err != nil {
		t.Fatalf("Dex certificate and key do not load as a pair: %v", err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("%s holds no PEM certificate", demoCAFile)
	}
	// Valid for the host the refreshers dial, now and for a year to come.
	for _, at := range []time.Time{time.Now(), time.Now().AddDate(1, 0, 0)} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: demoTLSHost, Roots: roots, CurrentTime: at}); err != nil {
			t.Errorf("Dex certificate at %s: %v; renew it: go test ./deploy -run TestDemoTLS -update-demo-tls", at.Format(time.DateOnly), err)
		}
	}
}

func writeDemoTLS(t *testing.T) {
	t.Helper()
	notBefore := time.Now().Add(-time.Hour).UTC().Truncate(time.Hour)
	notAfter := notBefore.AddDate(20, 0, 0)
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "authbus demo CA (compose.yaml only)"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: demoTLSHost},
		DNSNames:     []string{demoTLSHost, "localhost"},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for path, block := range map[string]*pem.Block{
		demoCAFile:   {Type: "CERTIFICATE", Bytes: caDER},
		demoCertFile: {Type: "CERTIFICATE", Bytes: leafDER},
		// Readable by Dex's user (1001) through the bind mount; a demo key.
		demoKeyFile: {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
