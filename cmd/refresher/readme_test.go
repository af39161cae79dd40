package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/authbus/authbus/internal/authtest"
	"github.com/authbus/authbus/internal/cmdtest"
	"github.com/authbus/authbus/internal/fleet"
	"github.com/authbus/authbus/internal/natstest"
)

// readmeBlock is one fenced shell block of README.md.
type readmeBlock struct {
	tag      string   // "" (run by TestREADMEWalkthrough), "ci" (.ci/run) or "docker"
	commands []string // continuation lines joined, comments dropped
	line     int
}

var fence = regexp.MustCompile("^```(\\S*)\\s*(\\S*)")

// readmeBlocks returns the README's shell blocks. A fence whose language is
// another shell dialect is an error: every command must be in a block the
// tests know about.
func readmeBlocks(t *testing.T) []readmeBlock {
	t.Helper()
	f, err := os.Open("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var blocks []readmeBlock
	var cur *readmeBlock
	var cont string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if m := fence.FindStringSubmatch(line); m != nil {
			if cur != nil {
				blocks = append(blocks, *cur)
				cur = nil
				continue
			}
			switch m[1] {
			case "sh":
				cur = &readmeBlock{tag: m[2], line: n}
				if cur.tag != "" && cur.tag != "ci" && cur.tag != "docker" {
					t.Errorf("README.md:%d: ```sh %s: use ```sh, ```sh ci or ```sh docker", n, cur.tag)
				}
			case "bash", "shell", "console", "zsh", "shell-session":
				t.Errorf("README.md:%d: ```%s block: write commands in ```sh blocks, which the tests run", n, m[1])
			}
			if cur == nil {
				// A block of another language: skip to its end.
				for sc.Scan() {
					n++
					if strings.HasPrefix(sc.Text(), "```") {
						break
					}
				}
			}
			continue
		}
		if cur == nil {
			continue
		}
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if c, ok := strings.CutSuffix(trimmed, `\`); ok {
			cont += c + " "
			continue
		}
		cur.commands = append(cur.commands, cont+trimmed)
		cont = ""
	}
	if cur != nil {
		t.Fatalf("README.md:%d: unterminated code block", cur.line)
	}
	return blocks
}

// TestREADMEBlocksAreExercised checks the blocks the walkthrough does not
// run: `sh ci` commands are what .ci/run runs, and `sh docker` commands
// name services and profiles compose.yaml has (CI has no container engine;
// deploy/deploy_test.go checks compose.yaml itself, and where `docker
// compose` is installed this test has it validate the file).
func TestREADMEBlocksAreExercised(t *testing.T) {
	ci, err := os.ReadFile("../../.ci/run")
	if err != nil {
		t.Fatal(err)
	}
	compose, err := os.ReadFile("../../compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var plain int
	for _, b := range readmeBlocks(t) {
		for _, c := range b.commands {
			switch b.tag {
			case "":
				plain++
			case "ci":
				if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(c) + `$`).Match(ci) {
					t.Errorf("README.md:%d: %q is in a ```sh ci block, but .ci/run does not run it", b.line, c)
				}
			case "docker":
				if !strings.HasPrefix(c, "docker compose ") {
					t.Errorf("README.md:%d: %q in a ```sh docker block: only docker compose commands go there", b.line, c)
				}
				words := strings.Fields(c)
				up := false
				for i, w := range words {
					switch {
					case w == "--profile" && i+1 < len(words):
						if !strings.Contains(string(compose), `profiles: ["`+words[i+1]+`"]`) {
							t.Errorf("README.md:%d: profile %q is not in compose.yaml", b.line, words[i+1])
						}
					case w == "up":
						up = true
					case up && !strings.HasPrefix(w, "-") && !regexp.MustCompile(`(?m)^  `+regexp.QuoteMeta(w)+`:$`).Match(compose):
						// The words after "up" that are not flags name services.
						t.Errorf("README.md:%d: service %q is not in compose.yaml", b.line, w)
					}
				}
			}
		}
	}
	if plain == 0 {
		t.Error("README.md has no ```sh block for the walkthrough to run")
	}
	if out, err := exec.Command("docker", "compose", "version").CombinedOutput(); err != nil {
		t.Logf("docker compose is not installed (%v: %s); compose.yaml is checked by deploy/deploy_test.go only", err, strings.TrimSpace(string(out)))
		return
	}
	if out, err := exec.Command("docker", "compose", "-f", "../../compose.yaml", "--profile", "storm", "config", "-q").CombinedOutput(); err != nil {
		t.Errorf("docker compose config: %v\n%s", err, out)
	}
}

// TestREADMEWalkthrough runs the README's ```sh blocks in order, as a reader
// would, with the real binaries in place of `go run ./cmd/…`. Placeholders
// get real values: the authorization server idp.example.com is a test server
// that knows the client my-client, "..." is its secret, token.json holds a
// token it issued, nats.internal is a second NATS server and /secrets a
// temporary folder. The embedded refresher listens on a free port
// (AUTHBUS_LISTEN) and the publisher finds it there (NATS_URL); each
// refresher's operations listener gets a free port (AUTHBUS_METRICS_ADDR);
// the development authorization server gets one too
// (AUTHBUS_DEVSERVER_LISTEN). The test plays the person at a login: it opens
// the printed URL and approves. Every watched credential must rotate.
func TestREADMEWalkthrough(t *testing.T) {
	bin := cmdtest.Binaries(t)
	as := authtest.New(t)
	const secret = "readme-client-secret"
	as.AddClient("my-client", secret)
	tok := as.Issue("my-client")
	work := t.TempDir()
	tokenJSON := fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer","refresh_token":%q,"expires_in":3600}`, tok.AccessToken, tok.RefreshToken)
	if err := os.WriteFile(filepath.Join(work, "token.json"), []byte(tokenJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	other := natstest.RunServer(t)
	secrets := t.TempDir()
	addr := cmdtest.FreeAddr(t)
	devAddr := cmdtest.FreeAddr(t)

	replacer := strings.NewReplacer(
		"go run ./cmd/refresher", filepath.Join(bin, "refresher"),
		"go run ./cmd/publisher", "env NATS_URL=nats://"+addr+" "+filepath.Join(bin, "publisher"),
		"https://idp.example.com/oauth/token", as.TokenURL(),
		"https://idp.example.com", as.BaseURL(),
		"http://127.0.0.1:9096", "http://"+devAddr,
		"AUTHBUS_CLIENT_SECRET=...", "AUTHBUS_CLIENT_SECRET="+secret,
		"nats://nats.internal:4222", other.ClientURL(),
		"/secrets/", secrets+"/",
	)
	env := append(cmdtest.CleanEnv(), "AUTHBUS_LISTEN="+addr, "AUTHBUS_DATA_DIR="+filepath.Join(work, "authbus-data"),
		"AUTHBUS_DEVSERVER_LISTEN="+devAddr, "AUTHBUS_NO_BROWSER=true")

	type background struct {
		cmd    *exec.Cmd
		out    *fleet.LogBuffer
		exited chan error
		waited bool // exited was received: the process is gone
	}
	var daemons []*background
	t.Cleanup(func() {
		for _, d := range daemons {
			if !d.waited {
				_ = d.cmd.Process.Kill()
				<-d.exited
			}
		}
	})
	start := func(c, ready string) *background {
		t.Helper()
		cmd := exec.Command("bash", "-c", "exec "+c)
		// Two refreshers on one machine need their own operations listener.
		cmd.Dir, cmd.Env = work, append(env, "AUTHBUS_METRICS_ADDR="+cmdtest.FreeAddr(t))
		d := &background{cmd: cmd, out: &fleet.LogBuffer{}, exited: make(chan error, 1)}
		cmd.Stdout, cmd.Stderr = d.out, d.out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { d.exited <- cmd.Wait() }()
		daemons = append(daemons, d)
		waitForText(t, d.out, ready, 30*time.Second)
		return d
	}
	stop := func(d *background, what string) {
		t.Helper()
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-d.exited:
			d.waited = true
			if err != nil && !strings.Contains(what, "watch") {
				t.Errorf("%s after SIGTERM: %v\n%s", what, err, d.out.String())
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not stop within 30s of SIGTERM", what)
		}
	}

	watches := map[string]*background{} // by key
	ran := 0
	for _, b := range readmeBlocks(t) {
		if b.tag != "" {
			continue
		}
		for _, c := range b.commands {
			ran++
			run := replacer.Replace(c)
			t.Logf("README.md:%d: %s", b.line, c)
			switch {
			case strings.HasPrefix(c, "go run ./cmd/refresher") && !regexp.MustCompile(`^go run ./cmd/refresher (keys|permissions)\b`).MatchString(c):
				d := start(run, "refresher ready")
				if strings.Contains(c, "--nats-url") {
					// A refresher joining another deployment: it starts, then
					// leaves again.
					stop(d, c)
				}
			case strings.HasPrefix(c, "go run ./cmd/publisher watch"):
				words := strings.Fields(c)
				watches[words[len(words)-1]] = start(run, "watching")
			case strings.HasPrefix(c, "go run ./cmd/publisher devserver"):
				start(run, "log in and register")
			case strings.HasPrefix(c, "go run ./cmd/publisher login"):
				login := start(run, "/authorize?")
				approve(t, login.out.String())
				select {
				case err := <-login.exited:
					login.waited = true
					if err != nil {
						t.Fatalf("README.md:%d: %s: %v\n%s", b.line, c, err, login.out)
					}
				case <-time.After(30 * time.Second):
					t.Fatalf("README.md:%d: %s did not end within 30s of the approval:\n%s", b.line, c, login.out)
				}
			default:
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				cmd := exec.CommandContext(ctx, "bash", "-c", run)
				cmd.Dir, cmd.Env = work, env
				out, err := cmd.CombinedOutput()
				cancel()
				if err != nil {
					t.Fatalf("README.md:%d: %s: %v\n%s", b.line, c, err, out)
				}
				for _, s := range []string{tok.RefreshToken, secret} {
					if strings.Contains(string(out), s) {
						t.Errorf("README.md:%d: %s printed a secret (%.6s…)", b.line, c, s)
					}
				}
			}
		}
	}
	if len(watches) == 0 {
		t.Fatal("the README never runs publisher watch")
	}
	for key, w := range watches {
		// The development server's one-minute tokens are renewed half a
		// minute after the login, without a 401.
		waitForText(t, w.out, "auth.rotated "+key+" version=2", 60*time.Second)
	}
	if got := as.Calls(); got != 1 {
		t.Errorf("token-endpoint calls = %d, want 1 (the README's one 401)", got)
	}
	for _, d := range daemons {
		if !d.waited {
			stop(d, strings.Join(d.cmd.Args, " "))
		}
	}
	t.Logf("ran %d README commands", ran)
}

// approve plays the person at a login: it opens the authorization URL the
// login printed and presses Approve; the redirect reaches the login.
func approve(t *testing.T, output string) {
	t.Helper()
	u := regexp.MustCompile(`http://\S+/authorize\?\S+`).FindString(output)
	if u == "" {
		t.Fatalf("login printed no authorization URL:\n%s", output)
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := authtest.Browser{Client: &http.Client{Transport: tr}}.Approve(ctx, u)
	if err != nil || p.Status != http.StatusOK {
		t.Fatalf("approve the login at %s: %v %+v", u, err, p)
	}
}
