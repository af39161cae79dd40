package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
)

const importAbout = `
Register the tokens that MCP clients and OAuth libraries saved on disk, so
that authbus refreshes them from now on. PATH is a file or a folder (read
recursively); every *.json file in it is read. Formats (docs/mcp.md has
their sources):

  MCP Python SDK storage   {"tokens": OAuthToken, "client_info": OAuthClientInformationFull,
                            "server_url": …}, one file per server
  token                    an OAuth token response: the MCP Python SDK's OAuthToken, the MCP
                           TypeScript SDK's OAuthTokens (with its "issuer"), RFC 6749
  x/oauth2 token           golang.org/x/oauth2's Token: access_token, refresh_token, "expiry"
  FastMCP token            {"token_payload": OAuthToken, "expires_at": …}
  client information       OAuthClientInformation(Full) of either SDK: client_id, client_secret,
                           token_endpoint_auth_method; paired with the token file of the
                           same name, NAME_client_info.json beside NAME_tokens.json (as
                           mcp-remote and FastMCP save them)

Each credential's key comes from --key-template, whose placeholders are:
  {user}    --user (default: the name of the user running import)
  {server}  {host} when the server's URL is known, else {name}
  {host}    the host of the server's URL ("server_url" in the file, or --server-url),
            dots turned into dashes: mcp.github.com → mcp-github-com
  {name}    the file's name without .json and without _tokens or _client_info
  {dir}     the name of the folder that holds the file
Characters outside [A-Za-z0-9_-] become "-". Example:
  publisher import --key-template 'acme.{user}.{server}' --issuer https://auth.example.com ~/.mcp-auth

The token endpoint comes from --token-endpoint, else from --issuer by
discovery (as for register), else from the "issuer" the MCP TypeScript SDK
stores with its tokens. The client comes from the file's client information,
else from --client-id and --client-secret. The token's scope becomes the
scopes asked for on refresh; the server's URL, when known, the RFC 8707
resource (--resource and --scope override both). An expiry saved as
expires_in counts from the file's modification time.

--dry-run reads and checks everything and sends nothing. A file that cannot
be imported is named on stderr with the reason; the others are imported all
the same, and the exit status is 1. Tokens and secrets from the files are
never printed.`

// importFlags are import's own settings.
type importFlags struct {
	req                    events.RegisterRequest // defaults from the register flags
	scopes                 cli.StringList
	template, user, server string
	dryRun                 bool
}

func importCmd(ctx context.Context, args []string, s streams) error {
	f := newFlags("import", "import [flags] PATH…", importAbout, s)
	var o importFlags
	defineRegisterFlags(f, &o.req, &o.scopes)
	f.StringVar(&o.template, "key-template", "", "credential key of each imported token, with placeholders such as acme.{user}.{server} (see above)")
	f.bind("key-template", "AUTHBUS_KEY_TEMPLATE")
	f.StringVar(&o.user, "user", currentUser(), "the value of {user}")
	f.bind("user", "AUTHBUS_USER")
	f.StringVar(&o.server, "server-url", "", "URL of the MCP server the tokens are for, when the files do not say")
	f.BoolVar(&o.dryRun, "dry-run", false, "read and check everything, register nothing")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() == 0 {
		return usageErrorf("give one or more files or folders to import; run \"publisher import --help\"")
	}
	if err := o.checkTemplate(); err != nil {
		return err
	}
	if o.server != "" {
		if _, err := serverHost(o.server); err != nil {
			return usageErrorf("--server-url: %v", err)
		}
	}

	recs, failed := collectSaved(f.Args())
	byKey := map[events.Key]*savedCred{}
	for _, r := range recs {
		if r.err == nil {
			r.err = o.prepare(r)
		}
		if r.err != nil {
			continue
		}
		// A second registration of a key would silently replace the
		// first one's tokens.
		if first, ok := byKey[r.key]; ok {
			r.err = fmt.Errorf("--key-template gives it the key %s, as it gives %s; tell them apart with {name}, {dir} or {host}", r.key, first.tokenPath)
			continue
		}
		byKey[r.key] = r
	}
	var c *client
	if !o.dryRun && slices.ContainsFunc(recs, func(r *savedCred) bool { return r.err == nil }) {
		var err error
		if c, err = f.connect(); err != nil {
			return err
		}
		defer c.close()
	}
	for _, r := range recs {
		switch {
		case r.err != nil:
		case o.dryRun:
			r.result = "would register"
		default:
			reply, err := c.register(ctx, r.key, r.req)
			if err != nil {
				r.err = fmt.Errorf("register %s: %w", r.key, err)
				continue
			}
			r.result = fmt.Sprintf("registered: version %d, fingerprint %s", reply.Version, reply.Fingerprint)
		}
	}
	printImport(s, recs)
	for _, r := range recs {
		if r.err != nil {
			failed = append(failed, fmt.Errorf("%s: %w", r.files(), r.err))
		}
	}
	for _, err := range failed {
		fmt.Fprintf(s.errOut, "import: %v\n", err)
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of the files could not be imported (see above); fix them and import them again", len(failed))
	}
	return nil
}

// currentUser is the default of --user.
func currentUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return ""
}

var placeholderRE = regexp.MustCompile(`\{[^{}]*\}`)

// checkTemplate refuses a template that cannot give a key, before any file
// is read.
func (o *importFlags) checkTemplate() error {
	if o.template == "" {
		return usageErrorf("--key-template is required: say which key each token gets, such as 'acme.{user}.{server}'")
	}
	for _, ph := range placeholderRE.FindAllString(o.template, -1) {
		if !slices.Contains([]string{"{user}", "{server}", "{host}", "{name}", "{dir}"}, ph) {
			return usageErrorf("--key-template: unknown placeholder %s; use {user}, {server}, {host}, {name} or {dir}", ph)
		}
	}
	sample := placeholderRE.ReplaceAllString(o.template, "x")
	if _, err := events.ParseKey(sample); err != nil {
		return usageErrorf("--key-template %q: %v", o.template, err)
	}
	if strings.Contains(o.template, "{user}") && keyPart(o.user) == "" {
		return usageErrorf("--user: the template uses {user}; give a user name")
	}
	return nil
}

// A savedCred is one credential found on disk: a token, and the client
// information and server URL saved with it, if any.
type savedCred struct {
	tokenPath, clientPath string
	format                string
	token                 savedToken
	client                *savedClient
	serverURL             string
	modTime               time.Time

	key    events.Key
	req    events.RegisterRequest
	result string
	err    error
}

func (r *savedCred) files() string {
	if r.clientPath != "" {
		return r.tokenPath + " (with " + filepath.Base(r.clientPath) + ")"
	}
	return r.tokenPath
}

// savedToken is a token as clients save it: RFC 6749 §5.1 fields (the MCP
// SDKs' OAuthToken and OAuthTokens), x/oauth2's "expiry", an absolute
// "expires_at", and the authorization server the MCP TypeScript SDK notes.
type savedToken struct {
	raw    json.RawMessage // the token object, for mergeTokenFile
	Scope  string          `json:"scope"`
	Issuer string          `json:"issuer"`
	oauth2 bool            // has "expiry": golang.org/x/oauth2's Token
}

// savedClient is OAuthClientInformation(Full) of the MCP Python and
// TypeScript SDKs (RFC 7591 §3.2.1).
type savedClient struct {
	ClientID     string `json:"client_id"`
	ClientSecret string `json:"client_secret"`
	AuthMethod   string `json:"token_endpoint_auth_method"`
	Issuer       string `json:"issuer"`
}

// collectSaved reads every path: files, and the *.json files of folders.
// Errors that concern one file are kept with it or returned in failed.
func collectSaved(paths []string) (recs []*savedCred, failed []error) {
	var files []string
	for _, p := range paths {
		info, err := os.Stat(p)
		if err != nil {
			failed = append(failed, fmt.Errorf("%s: %w", p, errors.Unwrap(err)))
			continue
		}
		if !info.IsDir() {
			files = append(files, p)
			continue
		}
		err = filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				failed = append(failed, fmt.Errorf("%s: %w", path, errors.Unwrap(err)))
				return nil
			}
			if !d.IsDir() && strings.EqualFold(filepath.Ext(path), ".json") {
				files = append(files, path)
			}
			return nil
		})
		if err != nil {
			failed = append(failed, fmt.Errorf("%s: %w", p, err))
		}
	}
	clients := map[string]string{} // stem → client information file
	for _, path := range files {
		r, cl, err := readSaved(path)
		switch {
		case err != nil:
			failed = append(failed, fmt.Errorf("%s: %w", path, err))
		case r != nil:
			recs = append(recs, r)
		case cl != nil:
			clients[stem(path)] = path
		}
	}
	// Pair client information files with the token files of the same
	// stem in the same folder.
	for _, r := range recs {
		if r.client != nil {
			continue
		}
		if path, ok := clients[stem(r.tokenPath)]; ok {
			_, cl, _ := readSaved(path)
			r.client, r.clientPath = cl, path
			delete(clients, stem(r.tokenPath))
		}
	}
	for _, path := range clients {
		failed = append(failed, fmt.Errorf("%s: client information without tokens: no token file of the same name (such as %s) beside it; import the pair together",
			path, filepath.Base(stem(path))+"_tokens.json"))
	}
	return recs, failed
}

// stem is path without .json and a _tokens or _client_info suffix, for
// pairing and for {name}.
func stem(path string) string {
	base := strings.TrimSuffix(path, filepath.Ext(path))
	for _, suffix := range []string{"tokens", "token", "client_info", "client_information", "clientinfo"} {
		for _, sep := range []string{"_", "-", "."} {
			if s, ok := strings.CutSuffix(base, sep+suffix); ok && filepath.Base(s) != "" {
				return s
			}
		}
	}
	return base
}

// maxSavedFile bounds what import reads of one file.
const maxSavedFile = 1 << 20

// readSaved reads one file: a credential (with or without its client), or
// client information alone. Errors describe the file's shape, never its
// values.
func readSaved(path string) (*savedCred, *savedClient, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, nil, errors.Unwrap(err)
	}
	if info.Size() > maxSavedFile {
		return nil, nil, fmt.Errorf("%d bytes, more than a token file holds (%d); give the token files only", info.Size(), maxSavedFile)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, errors.Unwrap(err)
	}
	obj, err := object(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("not a JSON object (%v); import reads token and client information files saved as JSON", jsonProblem(err))
	}
	if inner, ok := obj["data"]; ok && !has(obj, "access_token", "client_id", "tokens", "token_payload") {
		// A wrapper some versions of FastMCP's JSONFileStorage write.
		if obj, err = object(inner); err != nil {
			return nil, nil, fmt.Errorf(`"data" is not a JSON object (%v)`, jsonProblem(err))
		}
	}
	r := &savedCred{tokenPath: path, modTime: info.ModTime()}
	switch {
	case has(obj, "tokens"):
		r.format = "MCP Python SDK storage"
		if err := r.setToken(obj["tokens"], nil); err != nil {
			return nil, nil, fmt.Errorf(`"tokens": %w`, err)
		}
		for _, name := range []string{"client_info", "client_information", "clientInformation"} {
			if c, ok := obj[name]; ok && !isAbsent(c) {
				if r.client, err = decodeClient(c); err != nil {
					return nil, nil, fmt.Errorf("%q: %w", name, err)
				}
			}
		}
		for _, name := range []string{"server_url", "serverUrl", "url"} {
			if v, ok := obj[name]; ok && json.Unmarshal(v, &r.serverURL) != nil {
				return nil, nil, fmt.Errorf("%q is not a string; give the MCP server's URL", name)
			}
			if r.serverURL != "" {
				break
			}
		}
	case has(obj, "token_payload"):
		r.format = "FastMCP token"
		if err := r.setToken(obj["token_payload"], obj["expires_at"]); err != nil {
			return nil, nil, fmt.Errorf(`"token_payload": %w`, err)
		}
	case has(obj, "access_token"):
		r.format = "token"
		if err := r.setToken(raw, nil); err != nil {
			return nil, nil, err
		}
		if r.token.oauth2 {
			r.format = "x/oauth2 token"
		}
	case has(obj, "client_id"):
		cl, err := decodeClient(encodeObject(obj))
		return nil, cl, err
	default:
		return nil, nil, errors.New(`neither a token (no "access_token", "tokens" or "token_payload") nor client information (no "client_id"); see docs/mcp.md for the formats import reads`)
	}
	return r, nil, nil
}

// setToken decodes a token object; expiresAt, when given, is an absolute
// expiry saved beside it (FastMCP).
func (r *savedCred) setToken(raw, expiresAt json.RawMessage) error {
	obj, err := object(raw)
	if err != nil {
		return fmt.Errorf("not a JSON object (%v)", jsonProblem(err))
	}
	if !has(obj, "access_token") {
		return errors.New(`no "access_token"; import needs the access token the client saved`)
	}
	if !isAbsent(expiresAt) {
		obj["expires_at"] = expiresAt
		raw = encodeObject(obj)
	}
	r.token.raw = raw
	if err := json.Unmarshal(raw, &r.token); err != nil {
		return fmt.Errorf("a member has the wrong type (%v)", jsonProblem(err))
	}
	_, r.token.oauth2 = obj["expiry"]
	return nil
}

func decodeClient(raw json.RawMessage) (*savedClient, error) {
	var c savedClient
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("not client information (%v)", jsonProblem(err))
	}
	if c.ClientID == "" {
		return nil, errors.New(`client information without "client_id"`)
	}
	return &c, nil
}

// prepare builds the register request and the key of r from the file and
// the flags.
func (o *importFlags) prepare(r *savedCred) error {
	req := o.req
	req.Scopes = slices.Clone([]string(o.scopes))
	var tok events.RegisterToken
	if err := mergeTokenFile(r.token.raw, &tok); err != nil {
		return err
	}
	if tok.ExpiresIn > 0 {
		// Relative to when the client received the token, which the
		// file's modification time approximates; "now" would extend
		// an old token's life.
		tok.ExpiresAt, tok.ExpiresIn = r.modTime.Add(time.Duration(tok.ExpiresIn)*time.Second).UTC(), 0
	}
	req.Token = tok
	if len(req.Scopes) == 0 {
		req.Scopes = strings.Fields(r.token.Scope)
	}
	if r.client != nil {
		req.ClientID, req.ClientSecret = r.client.ClientID, r.client.ClientSecret
		if req.AuthStyle == "" {
			switch r.client.AuthMethod {
			case "client_secret_basic":
				req.AuthStyle = events.AuthStyleBasic
			case "client_secret_post", "none":
				// A public client sends its id in the form.
				req.AuthStyle = events.AuthStylePost
			}
		}
	}
	if req.TokenEndpoint == "" && req.Issuer == "" {
		req.Issuer = r.token.Issuer
		if req.Issuer == "" && r.client != nil {
			req.Issuer = r.client.Issuer
		}
		if req.Issuer == "" {
			return errors.New("no token endpoint: the file does not name its authorization server; give --token-endpoint or --issuer")
		}
	}
	server := r.serverURL
	if server == "" {
		server = o.server
	}
	if req.Resource == "" && server != "" {
		req.Resource = server
	}
	key, err := o.keyOf(r, server)
	if err != nil {
		return err
	}
	if err := checkRegister(req); err != nil {
		return err
	}
	r.key, r.req = key, req
	return nil
}

// keyOf fills in the key template for r.
func (o *importFlags) keyOf(r *savedCred, server string) (events.Key, error) {
	name := keyPart(filepath.Base(stem(r.tokenPath)))
	host := ""
	if server != "" {
		h, err := serverHost(server)
		if err != nil {
			return events.Key{}, fmt.Errorf("server URL: %w", err)
		}
		host = keyPart(h)
	}
	values := map[string]string{
		"{user}": keyPart(o.user), "{name}": name, "{host}": host,
		"{dir}":    keyPart(filepath.Base(filepath.Dir(r.tokenPath))),
		"{server}": cmpOr(host, name),
	}
	var missing []string
	key := placeholderRE.ReplaceAllStringFunc(o.template, func(ph string) string {
		if values[ph] == "" {
			missing = append(missing, ph)
		}
		return values[ph]
	})
	if len(missing) > 0 {
		return events.Key{}, fmt.Errorf("--key-template: %s is empty for this file (the server's URL is not known: give --server-url, or use {name})", strings.Join(missing, ", "))
	}
	k, err := events.ParseKey(key)
	if err != nil {
		return events.Key{}, fmt.Errorf("--key-template gives %q: %w", key, err)
	}
	return k, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// serverHost is the host of an MCP server's URL.
func serverHost(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Hostname() == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", errors.New("not an http(s) URL with a host")
	}
	return u.Hostname(), nil
}

var notKeyChar = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// keyPart turns s into a credential key part: characters outside
// [A-Za-z0-9_-] become "-", at most events.MaxKeyPartLen of them.
func keyPart(s string) string {
	s = strings.Trim(notKeyChar.ReplaceAllString(s, "-"), "-")
	if len(s) > events.MaxKeyPartLen {
		s = strings.TrimRight(s[:events.MaxKeyPartLen], "-")
	}
	return s
}

// printImport prints the summary table; it shows no token or secret.
func printImport(s streams, recs []*savedCred) {
	if len(recs) == 0 {
		return
	}
	tw := tabwriter.NewWriter(s.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FILE\tFORMAT\tKEY\tEXPIRES\tREFRESH TOKEN\tRESULT")
	for _, r := range recs {
		format := r.format
		if r.clientPath != "" {
			format += " + client information"
		}
		key, exp, refresh, result := "-", "-", "-", "failed (see below)"
		if r.err == nil {
			key, result = r.key.String(), r.result
			exp = "never"
			if !r.req.Token.ExpiresAt.IsZero() {
				exp = r.req.Token.ExpiresAt.UTC().Format(time.RFC3339)
			}
			refresh = "yes"
			if r.req.Token.RefreshToken == "" {
				refresh = "no: needs_reauth at the first 401"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.tokenPath, format, key, exp, refresh, result)
	}
	tw.Flush()
}

// object decodes a JSON object into its members.
func object(raw []byte) (map[string]json.RawMessage, error) {
	var obj map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&obj); err != nil {
		return nil, err
	}
	if obj == nil {
		return nil, errors.New("null")
	}
	return obj, nil
}

func has(obj map[string]json.RawMessage, names ...string) bool {
	for _, n := range names {
		if v, ok := obj[n]; ok && !isAbsent(v) {
			return true
		}
	}
	return false
}

func encodeObject(obj map[string]json.RawMessage) json.RawMessage {
	b, _ := json.Marshal(obj) // raw messages that were just decoded
	return b
}

// jsonProblem describes a decoding error without quoting the input: a
// syntax error says where, a type error which member.
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("invalid JSON at byte %d", syn.Offset)
	case errors.As(err, &typ):
		return fmt.Sprintf("%q should be %s, not %s", typ.Field, typ.Type, typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the JSON ends early"
	}
	return "not JSON"
}
