// Package deploy holds the deployment of authbus outside a developer's
// machine: the NATS cluster configuration (deploy/nats), the demo
// authorization server (deploy/dex), Prometheus and Grafana provisioning, and
// the tests that keep them, compose.yaml and the Dockerfile honest in a CI
// without a container engine. The package has no code of its own; its tests
// parse every config file with the loader of the program that reads it,
// check each flag and variable compose.yaml passes against the binaries'
// --help, and run the compose topology (three clustered NATS servers from
// these config files, three refreshers with --replicas 3) in one process.
package deploy
