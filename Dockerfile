# syntax=docker/dockerfile:1
#
# Stratus in a container (Docker with BuildKit, the default since Docker 23, or Podman):
#
#   docker build -t stratus .
#   docker run -p 1883:1883 -p 8080:8080 -p 5683:5683/udp stratus serve --demo
#
# Two stages. `build` compiles the release binary in the official Rust image and assembles
# the runtime root filesystem with packaging/rootfs.sh. `runtime` is FROM scratch holding
# that tree and nothing else.
#
# Why scratch and not distroless or debian-slim: the binary needs glibc, libgcc_s and
# OpenSSL's libssl/libcrypto (DTLS for CoAPS) and no other file. rootfs.sh copies exactly
# the libraries `ldd` names from the image the binary was linked in, so they always match
# it: no glibc version skew between a builder on one Debian release and a runtime image on
# another (the trap of `rust:latest` + `distroless/cc-debian12`), no shell or package
# manager to patch, and 28.5 MB in all (release build; the binary keeps its symbols, so a
# panic's backtrace names functions, for 2.6 MB). The price: no shell inside (`docker exec
# … sh` does not work; use `docker logs`, `docker cp`, or `docker exec NAME stratus …`), and
# the libraries are updated by rebuilding the image, as the binary is. A vendored, statically
# linked OpenSSL would have dropped two of the six libraries but compiled OpenSSL in every
# build.
#
# CI cannot pull base images (no registry), so it builds only the `runtime` stage, from a
# root filesystem that rootfs.sh made of the binary `.ci/run` built:
#   podman build --format docker --build-arg ROOTFS=prebuilt -f Dockerfile CONTEXT
# where CONTEXT holds `image/` (see tests/container/run.sh). `runtime` is the same either
# way; only the stage its files come from changes.

# Where the runtime stage's files come from: `build` (the default) or `prebuilt`. The
# default is in `FROM ${ROOTFS:-build}` below and not here: Podman 4.3 (Buildah 1.28) decides
# which stages to build without an ARG's default value, skips `build`, then fails on it.
ARG ROOTFS=
# Any Rust 1.89 or later builds Cargo.lock; `1` is the newest stable.
ARG RUST_VERSION=1

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# OpenSSL headers for the `openssl` crate; binutils for strip (rootfs.sh).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev pkg-config binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The release profile without its debug line tables: the image would not keep them anyway.
# The caches keep the registry and the target dir between builds (BuildKit, Buildah).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked -p stratus \
    && packaging/rootfs.sh target/release/stratus /image

# What rootfs.sh made outside the build, in the context's image/ (CI).
FROM scratch AS prebuilt
COPY image/ /image/

FROM ${ROOTFS:-build} AS rootfs

FROM scratch AS runtime
COPY --from=rootfs /image/base/ /
# The volume's mount point belongs to the runtime user, and so does a new named volume.
COPY --from=rootfs --chown=10001:10001 /image/owned/ /
# Inside the container every listener binds all addresses (a published port reaches it),
# and all state lives in the volume. Flags (`--bind`, `--data-dir`) still override these.
ENV STRATUS_SERVER__BIND=0.0.0.0 \
    STRATUS_SERVER__DATA_DIR=/data
USER 10001:10001
WORKDIR /data
VOLUME /data
# MQTT, MQTTS, HTTP, HTTPS, CoAP, CoAPS. The TLS ones listen once configured: [tls] for
# MQTTS/HTTPS, STRATUS_COAP__DTLS=true for CoAPS.
EXPOSE 1883 8883 8080 8443 5683/udp 5684/udp
# `stratus healthcheck` GETs /healthz on the configured HTTP port (no curl in here).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/stratus", "healthcheck"]
# SIGTERM (the default) closes connections, publishes wills and exits within 5 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/stratus"]
CMD ["serve"]
