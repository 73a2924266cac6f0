#!/usr/bin/env bash
# Prints krew/mailrelay.yaml (the krew plugin manifest of kubectl-mailrelay) ready
# for a release: each SHA256_<OS>_<ARCH> placeholder replaced by the sha256 of the
# archive the release workflow built, and the download URLs pointing at the GitHub
# release of $GITHUB_REPOSITORY when it is set (a fork's own releases).
#
#   hack/krew-manifest.sh 0.1.0 dist > dist/mailrelay.krew.yaml
#
# DIR holds kubectl-mailrelay_<version>_<os>_<arch>.tar.gz for linux and darwin,
# amd64 and arm64; the manifest must already carry VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: krew-manifest.sh VERSION DIR}
dir=${2:?usage: krew-manifest.sh VERSION DIR}
manifest=krew/mailrelay.yaml
fail() { echo "krew-manifest: $*" >&2; exit 1; }

grep -q "^  version: v${version}\$" "$manifest" || fail "$manifest is not at version v$version"
args=()
for os in linux darwin; do
  for arch in amd64 arm64; do
    archive="kubectl-mailrelay_${version}_${os}_${arch}.tar.gz"
    [ -f "$dir/$archive" ] || fail "$dir/$archive is missing"
    sum=$(sha256sum "$dir/$archive" | cut -d' ' -f1)
    placeholder="SHA256_$(printf '%s_%s' "$os" "$arch" | tr '[:lower:]' '[:upper:]')"
    grep -q "sha256: $placeholder\$" "$manifest" || fail "$manifest has no $placeholder"
    args+=(-e "s/sha256: $placeholder\$/sha256: $sum/")
  done
done
if [ -n "${GITHUB_REPOSITORY:-}" ]; then
  args+=(-e "s#https://github.com/[^/]*/[^/]*/releases/download/#https://github.com/$GITHUB_REPOSITORY/releases/download/#")
  args+=(-e "s#^  homepage: .*#  homepage: https://github.com/$GITHUB_REPOSITORY#")
fi
sed "${args[@]}" "$manifest"
