package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.yaml.in/yaml/v3"

	"github.com/authbus/authbus/internal/fleet"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(cleanupAfter{m})
}

// cleanupAfter removes the binaries built for the tests after they ran;
// goleak.VerifyTestMain exits the process itself.
type cleanupAfter struct{ m *testing.M }

func (c cleanupAfter) Run() int {
	defer func() {
		if binDir != "" {
			os.RemoveAll(binDir)
		}
	}()
	return c.m.Run()
}

var osUnsetenv = os.Unsetenv

// repoRoot is where compose.yaml and the Dockerfile live; tests run in deploy/.
const repoRoot = ".."

// The subset of the compose specification compose.yaml may use. Decoding is
// strict: a key outside it (a typo such as "depend_on") fails the test.
type composeFile struct {
	Name     string                    `yaml:"name"`
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
	Networks map[string]any            `yaml:"networks"`
	// Extension fields hold the anchors the services merge.
	XNats      any `yaml:"x-nats"`
	XRefresher any `yaml:"x-refresher"`
}

type composeService struct {
	Image           string                       `yaml:"image"`
	Build           *composeBuild                `yaml:"build"`
	Command         []string                     `yaml:"command"`
	Environment     map[string]string            `yaml:"environment"`
	Healthcheck     *composeHealthcheck          `yaml:"healthcheck"`
	Restart         string                       `yaml:"restart"`
	DependsOn       map[string]composeDependency `yaml:"depends_on"`
	Volumes         []string                     `yaml:"volumes"`
	Ports           []string                     `yaml:"ports"`
	Profiles        []string                     `yaml:"profiles"`
	Networks        []string                     `yaml:"networks"`
	StopGracePeriod string                       `yaml:"stop_grace_period"`
}

type composeBuild struct {
	Context    string `yaml:"context"`
	Target     string `yaml:"target"`
	Dockerfile string `yaml:"dockerfile"`
}

type composeHealthcheck struct {
	Test        []string `yaml:"test"`
	Disable     bool     `yaml:"disable"`
	Interval    string   `yaml:"interval"`
	Timeout     string   `yaml:"timeout"`
	Retries     int      `yaml:"retries"`
	StartPeriod string   `yaml:"start_period"`
}

type composeDependency struct {
	Condition string `yaml:"condition"`
}

var (
	composeOnce sync.Once
	composeData *composeFile
	composeErr  error
)

// loadCompose parses compose.yaml strictly and interpolates its variables
// with their defaults, as `docker compose` does with an empty environment.
func loadCompose(t *testing.T) *composeFile {
	t.Helper()
	composeOnce.Do(func() {
		raw, err := os.ReadFile(filepath.Join(repoRoot, "compose.yaml"))
		if err != nil {
			composeErr = err
			return
		}
		dec := yaml.NewDecoder(bytes.NewReader(raw))
		dec.KnownFields(true)
		var c composeFile
		if err := dec.Decode(&c); err != nil {
			composeErr = fmt.Errorf("compose.yaml: %w", err)
			return
		}
		for name, s := range c.Services {
			var errs []error
			interp := func(v string) string {
				out, err := interpolate(v, noEnv)
				if err != nil {
					errs = append(errs, err)
				}
				return out
			}
			for i, a := range s.Command {
				s.Command[i] = interp(a)
			}
			for k, v := range s.Environment {
				s.Environment[k] = interp(v)
			}
			for i, v := range s.Volumes {
				s.Volumes[i] = interp(v)
			}
			if len(errs) > 0 {
				composeErr = fmt.Errorf("compose.yaml service %s: %v", name, errs)
				return
			}
			c.Services[name] = s
		}
		composeData = &c
	})
	if composeErr != nil {
		t.Fatal(composeErr)
	}
	return composeData
}

func noEnv(string) (string, bool) { return "", false }

var varRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$\$|\$`)

// interpolate substitutes ${VAR}, ${VAR:-default}, ${VAR-default} and $$ as
// compose does. Other forms are refused, so compose.yaml stays within what
// this test understands.
func interpolate(s string, env func(string) (string, bool)) (string, error) {
	var err error
	out := varRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		sub := varRef.FindStringSubmatch(m)
		if sub[1] == "" {
			err = fmt.Errorf("%q: unsupported variable syntax; use ${NAME:-default}", s)
			return m
		}
		v, ok := env(sub[1])
		switch {
		case sub[2] == ":-" && (!ok || v == ""):
			return sub[3]
		case sub[2] == "-" && !ok:
			return sub[3]
		}
		return v
	})
	return out, err
}

func TestInterpolate(t *testing.T) {
	env := func(k string) (string, bool) {
		v, ok := map[string]string{"SET": "x", "EMPTY": ""}[k]
		return v, ok
	}
	for in, want := range map[string]string{
		"${SET:-d}": "x", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d", "${UNSET}": "", "a$$b": "a$b",
		"nats://u:${UNSET:-p}@h:4222": "nats://u:p@h:4222",
	} {
		if got, err := interpolate(in, env); err != nil || got != want {
			t.Errorf("interpolate(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := interpolate("${X:?required}", env); err == nil {
		t.Error("${X:?…} was accepted")
	}
}

// TestComposeStructure checks what `docker compose config` would and what
// an operator relies on: images or builds, restart policies and health
// checks on every service, dependencies and volumes that exist.
func TestComposeStructure(t *testing.T) {
	c := loadCompose(t)
	if c.Name != "authbus" {
		t.Errorf("project name %q, want authbus (the volume and network names derive from it)", c.Name)
	}
	stages := dockerfileStages(t)
	usedVolumes := map[string]bool{}
	for _, name := range slices.Sorted(maps.Keys(c.Services)) {
		s := c.Services[name]
		t.Run(name, func(t *testing.T) {
			if (s.Image == "") == (s.Build == nil) && s.Build == nil {
				t.Error("neither image nor build")
			}
			if s.Build != nil {
				if s.Build.Context != "." || s.Build.Dockerfile != "" {
					t.Errorf("build %+v: use context . and the repository's Dockerfile", *s.Build)
				}
				if !slices.Contains(stages, s.Build.Target) {
					t.Errorf("build target %q is not a stage of the Dockerfile (%v)", s.Build.Target, stages)
				}
			}
			oneShot := s.Restart == "no" || s.Restart == "on-failure"
			switch {
			case s.Restart == "":
				t.Error("no restart policy")
			case !oneShot && s.Restart != "unless-stopped" && s.Restart != "always":
				t.Errorf("restart %q: use unless-stopped for a service, no or on-failure for a job", s.Restart)
			case oneShot && len(s.Profiles) == 0:
				t.Errorf("restart %q outside a profile: a job that runs on every `up` should not be part of the default deployment", s.Restart)
			}
			switch hc := s.Healthcheck; {
			case hc == nil:
				t.Error("no healthcheck")
			case hc.Disable:
				if !oneShot {
					t.Error("healthcheck disabled on a long-running service")
				}
			case len(hc.Test) < 2 || (hc.Test[0] != "CMD" && hc.Test[0] != "CMD-SHELL"):
				t.Errorf("healthcheck test %q: use [\"CMD\", program, args…]", hc.Test)
			case hc.Interval == "" || hc.Timeout == "" || hc.Retries == 0:
				t.Errorf("healthcheck %+v: set interval, timeout and retries", *hc)
			}
			for dep, d := range s.DependsOn {
				target, ok := c.Services[dep]
				if !ok {
					t.Errorf("depends_on %q: no such service", dep)
					continue
				}
				switch d.Condition {
				case "service_healthy":
					if target.Healthcheck == nil || target.Healthcheck.Disable {
						t.Errorf("depends_on %s: service_healthy, but %s has no healthcheck", dep, dep)
					}
				case "service_started", "service_completed_successfully":
				default:
					t.Errorf("depends_on %s: condition %q", dep, d.Condition)
				}
				if len(s.Profiles) == 0 && len(target.Profiles) > 0 {
					t.Errorf("depends_on %s, which only runs with --profile %v", dep, target.Profiles)
				}
			}
			for _, v := range s.Volumes {
				src, dst, ok := strings.Cut(v, ":")
				if !ok || !strings.HasPrefix(dst, "/") {
					t.Errorf("volume %q: use source:/container/path[:ro]", v)
					continue
				}
				if strings.HasPrefix(src, ".") || strings.HasPrefix(src, "/") {
					if _, err := os.Stat(filepath.Join(repoRoot, src)); err != nil {
						t.Errorf("bind mount %q: %v", v, err)
					}
					continue
				}
				usedVolumes[src] = true
				if _, ok := c.Volumes[src]; !ok {
					t.Errorf("volume %q is not declared under the top-level volumes", src)
				}
			}
			for _, n := range s.Networks {
				if _, ok := c.Networks[n]; !ok {
					t.Errorf("network %q is not declared under the top-level networks", n)
				}
			}
			for _, p := range s.Ports {
				if !strings.HasPrefix(p, "127.0.0.1:") {
					t.Errorf("port %q is published on every interface; prefix it with 127.0.0.1:", p)
				}
			}
		})
	}
	for v := range c.Volumes {
		if !usedVolumes[v] {
			t.Errorf("volume %q is declared but no service mounts it", v)
		}
	}
}

// services returns the services whose name starts with prefix, sorted.
func services(c *composeFile, prefix string) []string {
	var out []string
	for name := range c.Services {
		if strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// flagValue returns the value of --name=value in args.
func flagValue(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// TestComposeTopologyWiring checks that the parts of compose.yaml name each
// other consistently: NATS nodes and their config files and passwords, the
// refreshers' URLs, replicas, seal key and metrics port, Prometheus targets,
// Grafana provisioning, Dex and the storm.
func TestComposeTopologyWiring(t *testing.T) {
	c := loadCompose(t)
	nodes := services(c, "nats-")
	if !slices.Equal(nodes, []string{"nats-1", "nats-2", "nats-3"}) {
		t.Fatalf("NATS services %v, want nats-1, nats-2, nats-3", nodes)
	}
	modVersion := goModVersion(t, "github.com/nats-io/nats-server/v2")
	confVars := natsConfigVariables(t)
	for i, n := range nodes {
		s := c.Services[n]
		if want := "nats:" + strings.TrimPrefix(modVersion, "v") + "-alpine"; s.Image != want {
			t.Errorf("%s: image %s, want %s (the server version the tests run, from go.mod)", n, s.Image, want)
		}
		if want := []string{"--config", "/etc/nats/" + filepath.Base(nodeFiles[i])}; !slices.Equal(s.Command, want) {
			t.Errorf("%s: command %q, want %q", n, s.Command, want)
		}
		if !slices.Contains(s.Volumes, "./deploy/nats:/etc/nats:ro") || !slices.Contains(s.Volumes, n+"-data:/data") {
			t.Errorf("%s: volumes %q, want the config folder and its own data volume on /data", n, s.Volumes)
		}
		for _, v := range confVars {
			if s.Environment[v] == "" {
				t.Errorf("%s: the NATS config reads $%s, which the service's environment does not set", n, v)
			}
		}
	}
	natsEnv := c.Services["nats-1"].Environment

	refreshers := services(c, "refresher-")
	if len(refreshers) != 3 {
		t.Fatalf("refresher services %v, want three", refreshers)
	}
	var targets []string
	for _, r := range refreshers {
		s := c.Services[r]
		natsURL, _ := flagValue(s.Command, "nats-url")
		var hosts []string
		for _, u := range strings.Split(natsURL, ",") {
			pu, err := url.Parse(u)
			if err != nil || pu.User != nil {
				t.Errorf("%s: --nats-url %q: want nats://host:port, with the user in --nats-user and the password in NATS_PASSWORD (%v)", r, u, err)
				continue
			}
			hosts = append(hosts, pu.Host)
		}
		if user, _ := flagValue(s.Command, "nats-user"); user != natsUsers["refresher"].user || s.Environment["NATS_PASSWORD"] != natsEnv[natsUsers["refresher"].passwordEnv] {
			t.Errorf("%s: logs in as %q, want user %s with the password the NATS servers get as %s", r, user, natsUsers["refresher"].user, natsUsers["refresher"].passwordEnv)
		}
		if !slices.Equal(hosts, []string{"nats-1:4222", "nats-2:4222", "nats-3:4222"}) {
			t.Errorf("%s: --nats-url hosts %v, want all three nodes", r, hosts)
		}
		if v, _ := flagValue(s.Command, "replicas"); v != "3" {
			t.Errorf("%s: --replicas %q, want 3", r, v)
		}
		key, _ := flagValue(s.Command, "seal-key-file")
		if !strings.HasPrefix(key, "/var/lib/authbus/keys/") || !slices.Contains(s.Volumes, "seal-key:/var/lib/authbus/keys") {
			t.Errorf("%s: --seal-key-file %q is not on the shared seal-key volume", r, key)
		}
		addr, _ := flagValue(s.Command, "metrics-addr")
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			t.Errorf("%s: --metrics-addr %q: %v", r, addr, err)
		}
		if hc := s.Healthcheck; hc == nil || !slices.Contains(hc.Test, "http://127.0.0.1:"+port+"/readyz") {
			t.Errorf("%s: healthcheck does not probe /readyz on the --metrics-addr port %s", r, port)
		}
		targets = append(targets, r+":"+port)
		if inst := s.Environment["AUTHBUS_INSTANCE"]; inst != r {
			t.Errorf("%s: AUTHBUS_INSTANCE %q, want the service name", r, inst)
		}
		if ep := s.Environment["OTEL_EXPORTER_OTLP_ENDPOINT"]; ep != "http://jaeger:4318" || c.Services["jaeger"].Image == "" {
			t.Errorf("%s: OTEL_EXPORTER_OTLP_ENDPOINT %q, want Jaeger's OTLP/HTTP receiver http://jaeger:4318", r, ep)
		}
	}

	// Prometheus scrapes exactly the refreshers' operations listeners.
	var prom struct {
		ScrapeConfigs []struct {
			MetricsPath   string `yaml:"metrics_path"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	readYAML(t, "prometheus/prometheus.yml", &prom)
	var scraped []string
	for _, sc := range prom.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			scraped = append(scraped, st.Targets...)
		}
	}
	slices.Sort(scraped)
	if !slices.Equal(scraped, targets) {
		t.Errorf("Prometheus scrapes %v, want the refreshers' --metrics-addr %v", scraped, targets)
	}
	if !slices.Contains(c.Services["prometheus"].Volumes, "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro") {
		t.Error("prometheus does not mount deploy/prometheus/prometheus.yml")
	}

	checkGrafana(t, c)
	checkDexAndStorm(t, c)
}

func checkGrafana(t *testing.T, c *composeFile) {
	t.Helper()
	var ds struct {
		Datasources []struct {
			UID, Type, URL string
		} `yaml:"datasources"`
	}
	readYAML(t, "grafana/provisioning/datasources/authbus.yaml", &ds)
	uids := map[string]bool{}
	for _, d := range ds.Datasources {
		uids[d.UID] = true
		u, err := url.Parse(d.URL)
		if err != nil || c.Services[u.Hostname()].Image == "" {
			t.Errorf("Grafana data source %s: URL %q does not name a compose service", d.UID, d.URL)
		}
	}
	var prov struct {
		Providers []struct {
			Options struct {
				Path string `yaml:"path"`
			} `yaml:"options"`
		} `yaml:"providers"`
	}
	readYAML(t, "grafana/provisioning/dashboards/authbus.yaml", &prov)
	g := c.Services["grafana"]
	if len(prov.Providers) != 1 || !slices.Contains(g.Volumes, "./deploy/grafana/authbus.json:"+prov.Providers[0].Options.Path+"/authbus.json:ro") {
		t.Errorf("grafana does not mount deploy/grafana/authbus.json where its dashboard provider looks")
	}
	if !slices.Contains(g.Volumes, "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro") {
		t.Error("grafana does not mount deploy/grafana/provisioning")
	}
	raw, err := os.ReadFile("grafana/authbus.json")
	if err != nil {
		t.Errorf("the dashboard compose.yaml provisions: %v", err)
		return
	}
	var dash any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("grafana/authbus.json: %v", err)
	}
	// Every data source the dashboard names by uid must be provisioned.
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if d, ok := v["datasource"].(map[string]any); ok {
				if uid, ok := d["uid"].(string); ok && !strings.HasPrefix(uid, "$") && uid != "-- Grafana --" && !uids[uid] {
					t.Errorf("grafana/authbus.json uses data source uid %q; provisioned are %v", uid, slices.Sorted(maps.Keys(uids)))
				}
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
}

func checkDexAndStorm(t *testing.T, c *composeFile) {
	t.Helper()
	var dex struct {
		Issuer string `yaml:"issuer"`
		Web    struct {
			HTTPS   string `yaml:"https"`
			HTTP    string `yaml:"http"`
			TLSCert string `yaml:"tlsCert"`
			TLSKey  string `yaml:"tlsKey"`
		} `yaml:"web"`
		OAuth2 struct {
			GrantTypes []string `yaml:"grantTypes"`
		} `yaml:"oauth2"`
		StaticClients []struct {
			ID         string   `yaml:"id"`
			SecretEnv  string   `yaml:"secretEnv"`
			GrantTypes []string `yaml:"grantTypes"`
		} `yaml:"staticClients"`
	}
	readYAML(t, "dex/config.yaml", &dex)
	d := c.Services["dex"]
	iss, err := url.Parse(dex.Issuer)
	if err != nil || iss.Scheme != "https" || iss.Hostname() != demoTLSHost {
		t.Fatalf("Dex issuer %q: want https on host %q (the service name its certificate is for)", dex.Issuer, demoTLSHost)
	}
	if _, port, _ := net.SplitHostPort(dex.Web.HTTPS); port != iss.Port() {
		t.Errorf("Dex serves https on %q, but its issuer says port %s", dex.Web.HTTPS, iss.Port())
	}
	if filepath.Dir(dex.Web.TLSCert) != "/etc/dex/tls" || filepath.Base(dex.Web.TLSCert) != filepath.Base(demoCertFile) ||
		filepath.Base(dex.Web.TLSKey) != filepath.Base(demoKeyFile) || !slices.Contains(d.Volumes, "./deploy/dex/tls:/etc/dex/tls:ro") {
		t.Errorf("Dex TLS files %s, %s are not the mounted deploy/dex/tls files", dex.Web.TLSCert, dex.Web.TLSKey)
	}
	if _, port, _ := net.SplitHostPort(dex.Web.HTTP); d.Healthcheck == nil || !slices.Contains(d.Healthcheck.Test, "http://127.0.0.1:"+port+iss.Path+"/healthz") {
		t.Errorf("Dex healthcheck does not probe %s/healthz on its http port %s", iss.Path, port)
	}
	clients := map[string][]string{}
	for _, cl := range dex.StaticClients {
		clients[cl.ID] = cl.GrantTypes
		if d.Environment[cl.SecretEnv] == "" {
			t.Errorf("Dex client %s reads its secret from $%s, which the dex service does not set", cl.ID, cl.SecretEnv)
		}
	}

	storm, ok := c.Services["storm"]
	if !ok {
		t.Fatal("no storm service")
	}
	if !slices.Equal(storm.Profiles, []string{"storm"}) || len(storm.Command) == 0 || storm.Command[0] != "storm" {
		t.Errorf("storm: profiles %v command %q, want profile storm running `publisher storm`", storm.Profiles, storm.Command)
	}
	tokenURL, _ := flagValue(storm.Command, "token-url")
	if tokenURL != dex.Issuer+"/token" {
		t.Errorf("storm --token-url %q, want Dex's token endpoint %s/token", tokenURL, dex.Issuer)
	}
	clientID, _ := flagValue(storm.Command, "client-id")
	if !slices.Contains(clients[clientID], "client_credentials") || !slices.Contains(dex.OAuth2.GrantTypes, "client_credentials") {
		t.Errorf("storm --client-id %q is not a Dex client allowed the client_credentials grant", clientID)
	}
	for _, svc := range []string{"refresher-1", "storm"} {
		if !slices.Contains(c.Services[svc].Volumes, "./deploy/dex/tls/ca.crt:/etc/authbus/ca/authbus-demo-ca.crt:ro") ||
			!strings.HasPrefix(c.Services[svc].Environment["SSL_CERT_DIR"], "/etc/authbus/ca") {
			t.Errorf("%s does not trust the demo CA (mount deploy/dex/tls/ca.crt and set SSL_CERT_DIR)", svc)
		}
	}
	natsURL, _ := flagValue(storm.Command, "nats-url")
	for _, u := range strings.Split(natsURL, ",") {
		pu, err := url.Parse(u)
		if pw, _ := pu.User.Password(); err != nil || pu.User.Username() != natsUsers["storm"].user || pw != c.Services["nats-1"].Environment[natsUsers["storm"].passwordEnv] {
			t.Errorf("storm --nats-url %q does not log in as user %s with %s", u, natsUsers["storm"].user, natsUsers["storm"].passwordEnv)
		}
	}
}

// natsConfigVariables returns the variables the NATS config files read from
// the environment: $NAME references they do not define themselves.
func natsConfigVariables(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob("nats/*.conf")
	ref := regexp.MustCompile(`\$([A-Za-z_][A-Za-z0-9_]*)`)
	quoted := regexp.MustCompile(`"[^"]*"|'[^']*'`)
	seen := map[string]bool{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(bytes.NewReader(raw))
		for sc.Scan() {
			line, _, _ := strings.Cut(sc.Text(), "#")
			// "$JS.API.>" is a subject; only unquoted $NAME is a variable.
			line = quoted.ReplaceAllString(line, "")
			for _, m := range ref.FindAllStringSubmatch(line, -1) {
				seen[m[1]] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

func readYAML(t *testing.T, file string, v any) {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// goModVersion returns the version go.mod requires of module.
func goModVersion(t *testing.T, module string) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", module).Output()
	if err != nil {
		t.Fatalf("go list -m %s: %v", module, err)
	}
	return strings.TrimSpace(string(out))
}

// natsHealthPath is the path of the NATS nodes' health check URL.
func natsHealthPath(t *testing.T, c *composeFile) string {
	t.Helper()
	hc := c.Services["nats-1"].Healthcheck
	if hc != nil {
		for _, a := range hc.Test {
			if p, ok := strings.CutPrefix(a, "http://localhost:8222"); ok {
				return p
			}
		}
	}
	t.Fatal("nats-1 healthcheck does not GET http://localhost:8222/…")
	return ""
}

// refresherReplicas is the --replicas the compose refreshers run with.
func refresherReplicas(t *testing.T, c *composeFile) int {
	t.Helper()
	v, _ := flagValue(c.Services["refresher-1"].Command, "replicas")
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("refresher-1 --replicas %q: %v", v, err)
	}
	return n
}

// The Dockerfile's stages and build, as far as CI can check without a
// container engine.

var fromLine = regexp.MustCompile(`(?m)^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?`)

func dockerfile(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

func dockerfileStages(t *testing.T) []string {
	var stages []string
	for _, m := range fromLine.FindAllStringSubmatch(dockerfile(t), -1) {
		stages = append(stages, m[2])
	}
	return stages
}

// TestDockerfile checks the image recipe: a Go builder of the go.mod
// version, static binaries, distroless final stages run as non-root, the
// refresher as the default target.
func TestDockerfile(t *testing.T) {
	df := dockerfile(t)
	froms := fromLine.FindAllStringSubmatch(df, -1)
	if len(froms) < 3 {
		t.Fatalf("Dockerfile has %d stages, want build, publisher, refresher", len(froms))
	}
	goVersion := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)`).FindStringSubmatch(df)
	mod, _ := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	goDirective := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if goVersion == nil || goDirective == nil || goVersion[1] != string(goDirective[1]) {
		t.Errorf("Dockerfile GO_VERSION %v does not match go.mod's go directive %s", goVersion, goDirective)
	}
	if froms[0][1] != "golang:${GO_VERSION}-bookworm" || froms[0][2] != "build" {
		t.Errorf("first stage %q, want the golang:${GO_VERSION} build stage", froms[0][0])
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/refresher ./cmd/publisher ./deploy/probe"} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile does not contain %q", want)
		}
	}
	// Each final stage: distroless static, non-root, an entrypoint.
	finals := strings.Split(df, "\nFROM ")[2:]
	for _, st := range finals {
		name := strings.Fields(st)[2]
		if !strings.HasPrefix(st, "gcr.io/distroless/static-debian12:nonroot AS ") {
			t.Errorf("stage %s: base %q, want gcr.io/distroless/static-debian12:nonroot", name, strings.Fields(st)[0])
		}
		if !strings.Contains(st, "\nUSER 65532:65532\n") || !strings.Contains(st, `ENTRYPOINT ["/usr/local/bin/`+name+`"]`) {
			t.Errorf("stage %s: want USER 65532:65532 and ENTRYPOINT /usr/local/bin/%s", name, name)
		}
		if !strings.Contains(st, "/out/probe") {
			t.Errorf("stage %s lacks the probe its compose health check runs", name)
		}
	}
	if last := froms[len(froms)-1][2]; last != "refresher" {
		t.Errorf("last stage %q: `docker build .` should build the refresher", last)
	}

	// With CGO_ENABLED=0 the Go linker makes static binaries that run without
	// libc; that works only if no package the commands import needs cgo.
	cmd := exec.Command("go", "list", "-deps", "-e", "-f", `{{if .Error}}{{.ImportPath}}: {{.Error}}{{end}}`,
		"github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("the commands do not build with CGO_ENABLED=0: %v\n%s", err, out)
	}
}

// TestDockerignore checks that the build context keeps every file the
// image's go build needs.
func TestDockerignore(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	var patterns []string
	for _, l := range strings.Split(string(raw), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			if strings.HasPrefix(l, "!") {
				t.Fatalf(".dockerignore: exceptions (%s) are beyond this test; keep the file to plain patterns", l)
			}
			patterns = append(patterns, strings.TrimPrefix(l, "/"))
		}
	}
	out, err := exec.Command("go", "list", "-deps", "-f", `{{if not .Standard}}{{.Dir}}{{range .GoFiles}} {{.}}{{end}}{{range .EmbedFiles}} {{.}}{{end}}{{end}}`,
		"github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	abs, _ := filepath.Abs(repoRoot)
	needed := []string{"go.mod", "go.sum"}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		rel, err := filepath.Rel(abs, f[0])
		if err != nil || strings.HasPrefix(rel, "..") {
			continue // a module dependency, downloaded in the image
		}
		for _, name := range f[1:] {
			needed = append(needed, filepath.ToSlash(filepath.Join(rel, name)))
		}
	}
	for _, file := range needed {
		for _, p := range patterns {
			if dockerignoreMatch(p, file) {
				t.Errorf("%s, which the image's build needs, is excluded by .dockerignore pattern %q", file, p)
			}
		}
	}
	// And the check itself sees exclusions.
	if !dockerignoreMatch("**/*_test.go", "kv/store_test.go") || !dockerignoreMatch("docs", "docs/operations.md") || dockerignoreMatch("docs", "kv/docs.go") {
		t.Error("dockerignoreMatch is broken")
	}
}

// dockerignoreMatch reports whether pattern excludes file (slash-separated,
// relative to the context): a pattern matches the file or a parent folder,
// and **/ matches any number of folders.
func dockerignoreMatch(pattern, file string) bool {
	parts := strings.Split(file, "/")
	for i := 1; i <= len(parts); i++ {
		prefix := strings.Join(parts[:i], "/")
		if ok, _ := path.Match(pattern, prefix); ok {
			return true
		}
		if rest, found := strings.CutPrefix(pattern, "**/"); found {
			for j := range i {
				if ok, _ := path.Match(rest, strings.Join(parts[j:i], "/")); ok {
					return true
				}
			}
		}
	}
	return false
}

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// buildBinaries builds the commands once per test run. It builds them as
// the README test of cmd/refresher does, so the two share the build cache;
// TestDockerfile checks that they also build with CGO_ENABLED=0.
func buildBinaries(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "authbus-deploy-bin-")
		if binErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/",
			"github.com/authbus/authbus/cmd/refresher", "github.com/authbus/authbus/cmd/publisher", "github.com/authbus/authbus/deploy/probe")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binDir
}

// helpText runs a command with --help and returns what it printed.
func helpText(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, append(args, "--help")...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v --help: %v\n%s", filepath.Base(bin), args, err, out)
	}
	return string(out)
}

var (
	helpFlag = regexp.MustCompile(`(?m)^  --?([a-z0-9][a-z0-9-]*)(?: (\S+))?\s*$`)
	helpEnv  = regexp.MustCompile(`\(env ([A-Z][A-Z0-9_]*)\)`)
)

// helpFlags returns the flags a --help text documents, with whether each
// takes a value, and the environment variables it names.
func helpFlags(help string) (flags map[string]bool, envs map[string]bool) {
	flags, envs = map[string]bool{}, map[string]bool{}
	for _, m := range helpFlag.FindAllStringSubmatch(help, -1) {
		flags[m[1]] = m[2] != ""
	}
	for _, m := range helpEnv.FindAllStringSubmatch(help, -1) {
		envs[m[1]] = true
	}
	return flags, envs
}

// otelVariables are the OpenTelemetry SDK environment variables compose.yaml
// may pass (a typo is a variable nobody reads).
var otelVariables = []string{
	"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED", "OTEL_PROPAGATORS",
	"OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER",
	"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
	"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
	"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TIMEOUT",
}

// TestComposeFlagsAndVariablesExist runs every authbus command line of
// compose.yaml through the real binary's flag parser (with --help appended,
// so it stops after parsing, in the service's environment) and checks each
// variable the service sets against the binary: named in --help, an
// OpenTelemetry SDK variable (and the binary carries the SDK's exporter
// selection), or Go's own SSL_CERT_DIR/SSL_CERT_FILE.
func TestComposeFlagsAndVariablesExist(t *testing.T) {
	c := loadCompose(t)
	bins := buildBinaries(t)
	for _, name := range slices.Sorted(maps.Keys(c.Services)) {
		s := c.Services[name]
		if s.Build == nil {
			continue
		}
		t.Run(name, func(t *testing.T) {
			bin := filepath.Join(bins, s.Build.Target)
			args := slices.Clone(s.Command)
			var sub []string
			if s.Build.Target == "publisher" {
				if len(args) == 0 {
					t.Fatal("publisher service without a command")
				}
				sub, args = slices.Clone(args[:1]), args[1:]
			}
			flags, envs := helpFlags(helpText(t, bin, sub...))
			for _, a := range args {
				name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
				takesValue, ok := flags[name]
				switch {
				case !strings.HasPrefix(a, "--"):
					t.Errorf("argument %q: write flags as --name=value", a)
				case !ok:
					t.Errorf("flag --%s does not exist (%s --help)", name, strings.Join(append([]string{s.Build.Target}, sub...), " "))
				case takesValue && !hasValue:
					t.Errorf("flag --%s takes a value: write --%s=VALUE", name, name)
				case !takesValue && hasValue && value != "true" && value != "false":
					t.Errorf("flag --%s is boolean, given %q", name, value)
				}
			}
			binary, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			for v := range s.Environment {
				switch {
				case envs[v]:
				case slices.Contains(otelVariables, v):
					if !bytes.Contains(binary, []byte("go.opentelemetry.io/contrib/exporters/autoexport")) {
						t.Errorf("%s is set, but %s does not build its exporters from the OTEL_* environment", v, s.Build.Target)
					}
				case v == "SSL_CERT_DIR" || v == "SSL_CERT_FILE":
				default:
					t.Errorf("environment %s is read by nothing: not in %s --help, not an OTel SDK variable", v, s.Build.Target)
				}
			}

			// The real parser, with the real values and environment.
			cmd := exec.Command(bin, append(append(sub, args...), "--help")...)
			cmd.Env = cleanEnv()
			for k, v := range s.Environment {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s rejects the compose command line: %v\n%s", strings.Join(append([]string{s.Build.Target}, sub...), " "), err, lastLines(string(out), 5))
			}
		})
	}
}

// TestRefresherHealthcheck runs the refresher the compose health check
// probes, on its embedded default, with the compose --metrics-addr port
// rewritten to a free one, and runs the health check command itself.
func TestRefresherHealthcheck(t *testing.T) {
	c := loadCompose(t)
	bins := buildBinaries(t)
	s := c.Services["refresher-1"]
	addr, _ := flagValue(s.Command, "metrics-addr")
	_, port, _ := net.SplitHostPort(addr)
	opsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	probe := slices.Clone(s.Healthcheck.Test[1:])
	for i, a := range probe {
		probe[i] = strings.Replace(a, "127.0.0.1:"+port, opsAddr, 1)
		if probe[i] == a && strings.HasPrefix(a, "http") {
			t.Fatalf("healthcheck URL %q is not on the --metrics-addr port %s", a, port)
		}
	}
	probe[0] = filepath.Join(bins, filepath.Base(probe[0]))

	runProbe := func() error {
		out, err := exec.Command(probe[0], probe[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := runProbe(); err == nil {
		t.Fatal("the health check passes with no refresher running")
	}
	ref := exec.Command(filepath.Join(bins, "refresher"), "--listen", net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t))),
		"--data-dir", t.TempDir(), "--metrics-addr="+opsAddr)
	ref.Env = cleanEnv()
	var log fleet.LogBuffer
	ref.Stdout, ref.Stderr = &log, &log
	if err := ref.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ref.Wait() }()
	defer func() {
		_ = ref.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = ref.Process.Kill()
			<-done
		}
	}()
	eventually(t, 30*time.Second, "the compose health check passes", func() bool { return runProbe() == nil })
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// cleanEnv is the test's environment without authbus, NATS or OTel
// settings, so a developer's shell does not change what the test runs.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AUTHBUS_") && !strings.HasPrefix(kv, "NATS_") && !strings.HasPrefix(kv, "OTEL_") {
			env = append(env, kv)
		}
	}
	return env
}
