# syntax=docker/dockerfile:1
#
# Container images of mailrelay. One build stage compiles both binaries; each
# image is a minimal distroless runtime (glibc, CA certificates, no shell) running
# as the non-root user 65532. The tag is the workspace version (Cargo.toml), and the
# names are what the Helm chart and the operator default to
# (operator/tests/images.rs checks that they agree):
#
#   docker build --target mailrelay -t ghcr.io/mailrelay/mailrelay:0.1.0 .
#   docker build --target mailrelay-operator -t ghcr.io/mailrelay/mailrelay-operator:0.1.0 .

ARG RUST_VERSION=1.90
ARG VERSION=0.1.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock, as CI tests them.
RUN cargo build --release --locked -p mailrelay -p mailrelay-operator \
 && mkdir -p /out \
 && cp target/release/mailrelay target/release/mailrelay-operator target/release/kubectl-mailrelay /out/

# The relay: `mailrelay serve --config /etc/mailrelay/mailrelay.yaml` (the
# operator passes those arguments and mounts the config).
FROM gcr.io/distroless/cc-debian12:nonroot AS mailrelay
ARG VERSION
LABEL org.opencontainers.image.title="mailrelay" \
      org.opencontainers.image.description="Kubernetes-native SMTP relay: store and forward with a Redis or embedded queue" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mailrelay/mailrelay"
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
      org.opencontainers.image.source="https://github.com/mailrelay/mailrelay"
COPY --from=builder /out/mailrelay-operator /usr/local/bin/mailrelay-operator
COPY --from=builder /out/kubectl-mailrelay /usr/local/bin/kubectl-mailrelay
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mailrelay-operator"]
CMD ["run"]
