# syntax=docker/dockerfile:1
#
# Container images of mailrelay. One build stage compiles both binaries; each
# image is a minimal distroless runtime (glibc, CA certificates, no shell) running
# as the non-root user 65532. The tag is the workspace version (Cargo.toml), and the
# names are what the Helm chart and the operator default to and what the release
# workflow (.github/workflows/release.yml) pushes, for linux/amd64 and linux/arm64
# (operator/tests/it/images.rs checks that they agree):
#
#   docker build --target mailrelay -t ghcr.io/mailrelay-dev/mailrelay:0.1.0 .
#   docker build --target mailrelay-operator -t ghcr.io/mailrelay-dev/mailrelay-operator:0.1.0 .
#
# The builder runs on the build machine's own architecture and cross-compiles for
# the target one (BuildKit's BUILDPLATFORM/TARGETARCH): a Rust build under QEMU
# emulation takes an hour, a cross build minutes.

ARG RUST_VERSION=1.90
ARG VERSION=0.1.0

FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
ARG TARGETARCH
WORKDIR /src
# The Rust target and, when it differs from the build machine's, a cross linker.
RUN set -eu; \
    case "${TARGETARCH:-$(dpkg --print-architecture)}" in \
      amd64) t=x86_64-unknown-linux-gnu; gcc=gcc-x86-64-linux-gnu; libc=libc6-dev-amd64-cross ;; \
      arm64) t=aarch64-unknown-linux-gnu; gcc=gcc-aarch64-linux-gnu; libc=libc6-dev-arm64-cross ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    echo "$t" > /rust-target; \
    if [ "$t" != "$(rustc -vV | sed -n 's/^host: //p')" ]; then \
      apt-get update && apt-get install -y --no-install-recommends "$gcc" "$libc" && rm -rf /var/lib/apt/lists/*; \
      rustup target add "$t"; \
    fi
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc
COPY . .
# --locked: exactly the dependency versions of Cargo.lock, as CI tests them.
RUN cargo build --release --locked --target "$(cat /rust-target)" -p mailrelay -p mailrelay-operator \
 && mkdir -p /out \
 && cd "target/$(cat /rust-target)/release" \
 && cp mailrelay mailrelay-operator kubectl-mailrelay /out/

# The relay: `mailrelay serve --config /etc/mailrelay/mailrelay.yaml` (the
# operator passes those arguments and mounts the config).
FROM gcr.io/distroless/cc-debian12:nonroot AS mailrelay
ARG VERSION
LABEL org.opencontainers.image.title="mailrelay" \
      org.opencontainers.image.description="Kubernetes-native SMTP relay: store and forward with a Redis or embedded queue" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mailrelay-dev/mailrelay"
COPY --from=builder /out/mailrelay /usr/local/bin/mailrelay
# The embedded queue (no Redis) lands in ./mailrelay-data: the user's home.
WORKDIR /home/nonroot
USER 65532:65532
EXPOSE 2525 9325
ENTRYPOINT ["/usr/local/bin/mailrelay"]
CMD ["serve"]

# The operator; the image also carries kubectl-mailrelay, for jobs that inspect
# relays from inside the cluster.
FROM gcr.io/distroless/cc-debian12:nonroot AS mailrelay-operator
ARG VERSION
LABEL org.opencontainers.image.title="mailrelay-operator" \
      org.opencontainers.image.description="Kubernetes operator for mailrelay (MailRelay and SendQuota resources)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mailrelay-dev/mailrelay"
COPY --from=builder /out/mailrelay-operator /usr/local/bin/mailrelay-operator
COPY --from=builder /out/kubectl-mailrelay /usr/local/bin/kubectl-mailrelay
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mailrelay-operator"]
CMD ["run"]
