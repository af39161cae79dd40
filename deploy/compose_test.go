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
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"go.yaml.in/yaml/v3"
)

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
		if user, _ := flagValue(s.Command, "nats-serve-user"); user != natsUsers["serve"].user || s.Environment["NATS_SERVE_PASSWORD"] != natsEnv[natsUsers["serve"].passwordEnv] {
			t.Errorf("%s: serves as %q, want user %s with the password the NATS servers get as %s", r, user, natsUsers["serve"].user, natsUsers["serve"].passwordEnv)
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
