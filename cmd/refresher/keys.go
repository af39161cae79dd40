package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/authbus/authbus/events"
	"github.com/authbus/authbus/internal/cli"
	"github.com/authbus/authbus/internal/embedded"
	"github.com/authbus/authbus/kv"
)

// keysLeaseTTL is the lease a reseal holds on each credential while it
// rewrites it: long enough for two KV round trips on a slow link.
const keysLeaseTTL = 10 * time.Second

type keysOptions struct {
	conn                                             cli.Conn
	listen, dataDir, sealKeyFile, prefix, natsConfig string
	reseal, retire                                   bool
}

const keysAbout = `
Manages the key ring that seals refresh tokens and client secrets at rest.

  list     the keys of the key file, which is active, and how many
           credentials use each
  rotate   add a new random key to the key file and make it active; then
           (unless --reseal=false) reseal every credential under it, and
           with --retire drop the keys no credential uses any more
  reseal   rewrite every credential still sealed with an older key, or
           written by an older version (its seals bind less; run it once
           after upgrading)
  retire   drop the keys that are neither active nor used by a credential

Refreshers load the key file at start. One still running with the old file
cannot open a credential resealed under the new key, so in a deployment that
keeps running: rotate --reseal=false, give every refresher the new file and
restart it, then reseal, then retire. With the refreshers stopped (or in the
embedded default, restarted right after) a plain rotate --retire does it all.
Each rewrite holds the credential's refresh lease and is a compare-and-set,
so it never races a refresh or overwrites a registration; a credential whose
refresh is in flight is reported busy: run reseal again.

Without --nats-url the command connects to the embedded server of a running
refresher on --listen, or starts the embedded server on --data-dir itself.
With --nats-url, --listen and --nats-config are refused (and reported as
ignored when they come from the environment).`

// keysSubcommands are the subcommands of refresher keys.
var keysSubcommands = []string{"list", "rotate", "reseal", "retire"}

func runKeys(args []string, stdout, stderr io.Writer) error {
	sub := ""
	if len(args) > 0 {
		sub, args = args[0], args[1:]
	}
	var o keysOptions
	fset := flag.NewFlagSet("refresher keys "+sub, flag.ContinueOnError)
	fset.SetOutput(io.Discard) // errors are returned, help goes to stdout
	env := cli.NewEnvFlags(fset)
	synopsis := "refresher keys list|rotate|reseal|retire [flags]"
	if slices.Contains(keysSubcommands, sub) {
		synopsis = "refresher keys " + sub + " [flags]"
	}
	usage := cli.Usage{Synopsis: synopsis, About: keysAbout, Groups: []cli.Group{cli.ConnGroup()}}
	o.conn.Define(env, "", "NATS deployment of the refreshers (default: a running refresher's embedded server on --listen, else the embedded server on --data-dir)")
	fset.StringVar(&o.listen, "listen", "127.0.0.1:4222", "client address of a running refresher's embedded server")
	env.Bind("listen", "AUTHBUS_LISTEN")
	fset.StringVar(&o.dataDir, "data-dir", "./authbus-data", "directory of the embedded server's store and of the default seal key file")
	env.Bind("data-dir", "AUTHBUS_DATA_DIR")
	fset.StringVar(&o.sealKeyFile, "seal-key-file", "", "the key file (default <data-dir>/seal-keys.json)")
	env.Bind("seal-key-file", "AUTHBUS_SEAL_KEY_FILE")
	fset.StringVar(&o.prefix, "prefix", "", "subject prefix (default auth)")
	env.Bind("prefix", "AUTHBUS_PREFIX")
	fset.StringVar(&o.natsConfig, "nats-config", "", "nats-server configuration file of the embedded server")
	env.Bind("nats-config", "AUTHBUS_NATS_CONFIG")
	if sub == "rotate" {
		fset.BoolVar(&o.reseal, "reseal", true, "reseal every credential under the new key")
		fset.BoolVar(&o.retire, "retire", false, "after resealing, drop the keys no credential uses")
	}
	switch sub {
	case "list", "rotate", "reseal", "retire":
	case "-h", "-help", "--help", "help":
		usage.Print(stdout, fset)
		return flag.ErrHelp
	case "":
		usage.Print(stderr, fset)
		return cli.UsageErrorf("missing subcommand: list, rotate, reseal or retire")
	default:
		return cli.UsageErrorf("unknown subcommand %q: use list, rotate, reseal or retire; see refresher keys --help", sub)
	}
	err := env.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		usage.Print(stdout, fset)
		return err
	}
	if err != nil {
		return cli.UsageErrorf("%v; see refresher keys %s --help", err, sub)
	}
	if fset.NArg() > 0 {
		return cli.UsageErrorf("unexpected arguments %q; see refresher keys %s --help", fset.Args(), sub)
	}
	if err := o.conn.Check(); err != nil {
		return err
	}
	ignored, err := embeddedOnly(env, o.conn, false)
	if err != nil {
		return err
	}
	for _, w := range ignored {
		fmt.Fprintln(stderr, "refresher keys:", w)
	}
	if o.sealKeyFile == "" {
		o.sealKeyFile = filepath.Join(o.dataDir, "seal-keys.json")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if sub == "rotate" {
		id, err := kv.AddKey(o.sealKeyFile)
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("no key file at %s: pass --seal-key-file, or start a refresher once to create it", o.sealKeyFile)
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "added key %s to %s; it is now the active key\n", id, o.sealKeyFile)
		fmt.Fprintln(stdout, "restart every refresher with this key file: one running with the old file cannot open credentials sealed under the new key")
		if !o.reseal {
			fmt.Fprintln(stdout, "then run: refresher keys reseal, and refresher keys retire")
			return nil
		}
	}
	// Never create a key file here: a new key could open nothing.
	ring, err := kv.LoadKeyRing(o.sealKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("no key file at %s: pass --seal-key-file, or start a refresher once to create it", o.sealKeyFile)
	}
	if err != nil {
		return err
	}
	nc, cleanup, err := o.connect()
	if err != nil {
		return err
	}
	defer cleanup()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	subj, err := events.NewSubjects(o.prefix)
	if err != nil {
		return fmt.Errorf("--prefix: %w", err)
	}
	store, err := kv.OpenStore(ctx, js, subj.CredentialsBucket(), ring)
	if err != nil {
		return err
	}

	switch sub {
	case "list":
		return listKeys(ctx, stdout, store, ring)
	case "rotate", "reseal":
		leases, err := kv.OpenLeases(ctx, js, subj.LeasesBucket(), keysLeaseTTL)
		if err != nil {
			return err
		}
		host, _ := os.Hostname()
		rep, err := store.Reseal(ctx, leases, fmt.Sprintf("keys-reseal-%s-%d", host, os.Getpid()))
		fmt.Fprintf(stdout, "resealed %d of %d credentials under key %s (%d already current, %d compare-and-set conflicts retried, %d busy, %d failed)\n",
			rep.Resealed, rep.Scanned, ring.ActiveID(), rep.Current, rep.Conflicts, rep.Busy, rep.Failed)
		if err != nil {
			return fmt.Errorf("reseal: %w", err)
		}
		if rep.Busy > 0 {
			fmt.Fprintf(stdout, "%d credentials were being refreshed throughout: run refresher keys reseal again\n", rep.Busy)
		}
		if sub == "reseal" || !o.retire {
			return nil
		}
	}
	return retireKeys(ctx, stdout, o.sealKeyFile, store)
}

func listKeys(ctx context.Context, stdout io.Writer, store *kv.Store, ring *kv.KeyRing) error {
	usage, err := store.KeyUsage(ctx)
	if err != nil {
		return err
	}
	for _, id := range ring.IDs() {
		mark := ""
		if id == ring.ActiveID() {
			mark = " (active)"
		}
		fmt.Fprintf(stdout, "%s%s: %d credentials\n", id, mark, usage[id])
		delete(usage, id)
	}
	for id, n := range usage {
		fmt.Fprintf(stdout, "%s (NOT IN THE KEY FILE): %d credentials cannot be opened; restore that key from a backup\n", id, n)
	}
	return nil
}

func retireKeys(ctx context.Context, stdout io.Writer, path string, store *kv.Store) error {
	usage, err := store.KeyUsage(ctx)
	if err != nil {
		return err
	}
	removed, err := kv.RetireKeys(path, usage)
	if err != nil {
		return err
	}
	if len(removed) == 0 {
		fmt.Fprintln(stdout, "no key retired: every key is active or still used")
		return nil
	}
	fmt.Fprintf(stdout, "retired keys %s from %s\n", strings.Join(removed, ", "), path)
	return nil
}

// connect reaches the refreshers' NATS: --nats-url, else a running
// refresher's embedded server on --listen, else an embedded server of our
// own on --data-dir (the refresher is stopped).
func (o keysOptions) connect() (*nats.Conn, func(), error) {
	if o.conn.URL != "" {
		nc, err := o.conn.Connect(nats.Name("authbus-keys"))
		if err != nil {
			return nil, nil, err
		}
		return nc, nc.Close, nil
	}
	opts, err := o.conn.Options()
	if err != nil {
		return nil, nil, err
	}
	opts = append(opts, nats.Name("authbus-keys"))
	if nc, err := nats.Connect("nats://"+o.listen, append(opts, nats.Timeout(time.Second))...); err == nil {
		return nc, nc.Close, nil
	}
	ns, err := embedded.Start(embedded.Config{Listen: "127.0.0.1:0", DataDir: o.dataDir, ConfigFile: o.natsConfig})
	if err != nil {
		return nil, nil, fmt.Errorf("no refresher answers on %s and the embedded server on %s did not start: %w", o.listen, o.dataDir, err)
	}
	nc, err := nats.Connect("", append(opts, nats.InProcessServer(ns))...)
	if err != nil {
		shutdown(ns)
		return nil, nil, fmt.Errorf("connect to the embedded server: %w", err)
	}
	return nc, func() { nc.Close(); shutdown(ns) }, nil
}

func shutdown(ns *server.Server) {
	ns.Shutdown()
	ns.WaitForShutdown()
}
