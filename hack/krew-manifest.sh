#!/usr/bin/env bash
# Prints the krew plugin manifest of kubectl-mailrelay for a release, with the
# sha256 of each archive the release workflow built:
#
#   hack/krew-manifest.sh 0.1.0 dist > dist/mailrelay.krew.yaml
#
# DIR holds kubectl-mailrelay_<version>_<os>_<arch>.tar.gz for linux and darwin,
# amd64 and arm64. The download URLs are the GitHub release of
# $GITHUB_REPOSITORY (set in GitHub Actions), else of the chart's `home`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: krew-manifest.sh VERSION DIR}
dir=${2:?usage: krew-manifest.sh VERSION DIR}
repo=${GITHUB_REPOSITORY:-$(sed -n 's#^home: https://github.com/##p' charts/mailrelay-operator/Chart.yaml)}
[ -n "$repo" ] || { echo "krew-manifest: no repository (GITHUB_REPOSITORY or Chart.yaml home)" >&2; exit 1; }

cat <<YAML
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: mailrelay
spec:
  version: v${version}
  homepage: https://github.com/${repo}
  shortDescription: Inspect and operate mailrelay SMTP relays
  description: |
    Shows MailRelay status, the shared mail queue, single messages with every
    delivery attempt, and send-quota usage; retries and deletes queued mail.
    Talks to the relays' admin API through the API server's service proxy, with
    your kubeconfig and RBAC.
  platforms:
YAML
for os in linux darwin; do
  for arch in amd64 arm64; do
    archive="kubectl-mailrelay_${version}_${os}_${arch}.tar.gz"
    [ -f "$dir/$archive" ] || { echo "krew-manifest: $dir/$archive is missing" >&2; exit 1; }
    sum=$(sha256sum "$dir/$archive" | cut -d' ' -f1)
    cat <<YAML
  - selector:
      matchLabels: {os: ${os}, arch: ${arch}}
    uri: https://github.com/${repo}/releases/download/v${version}/${archive}
    sha256: ${sum}
    bin: kubectl-mailrelay
    files:
    - {from: kubectl-mailrelay, to: .}
YAML
  done
done
