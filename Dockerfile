# syntax=docker/dockerfile:1
#
# The authbus images: static Go binaries (CGO_ENABLED=0) on distroless
# static, running as the non-root user nonroot (65532). Two targets:
#
#   docker build --target refresher -t authbus-refresher .   (the default)
#   docker build --target publisher -t authbus-publisher .
#
# Both carry /usr/local/bin/probe, the health check compose.yaml runs: the
# images have no shell, wget or curl.

# Keep in step with the go directive of go.mod (deploy/deploy_test.go checks).
ARG GO_VERSION=1.26

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Static binaries run on an image without libc; -trimpath keeps the build
# machine's paths out of them; there is no .git in the context to stamp.
ENV CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG TARGETOS TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    GOOS=$TARGETOS GOARCH=$TARGETARCH go build -ldflags="-s -w" -o /out/ ./cmd/refresher ./cmd/publisher ./deploy/probe
# The refresher's state directory, owned by nonroot in the final image so that
# a named volume mounted there starts out writable for it; 0700 because the
# seal key file lives there.
RUN install -d -m 0700 /out/state /out/state/keys

FROM gcr.io/distroless/static-debian12:nonroot AS publisher
COPY --from=build /out/publisher /out/probe /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/publisher"]

FROM gcr.io/distroless/static-debian12:nonroot AS refresher
COPY --from=build /out/refresher /out/publisher /out/probe /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/state /var/lib/authbus
WORKDIR /var/lib/authbus
# Without --nats-url the refresher runs its embedded NATS server: its store
# and the seal key go here; pass --listen 0.0.0.0:4222 to reach it from
# outside the container.
ENV AUTHBUS_DATA_DIR=/var/lib/authbus
USER 65532:65532
# NATS clients of the embedded server; the operations listener (--metrics-addr).
EXPOSE 4222 9464
ENTRYPOINT ["/usr/local/bin/refresher"]
