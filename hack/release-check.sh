#!/usr/bin/env bash
# Checks that a release tag, the workspace version, the chart and the chart's default
# images agree with what the release workflow publishes, then prints
# `version=…` and `owner=…` (lines for $GITHUB_OUTPUT).
#
#   hack/release-check.sh v0.1.0 mailrelay-dev
#
# The images go to ghcr.io/<owner>/mailrelay{,-operator}:<version>, <owner> being the
# repository owner lower-cased; the chart must default to exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:?usage: release-check.sh TAG OWNER}
owner=$(printf '%s' "${2:?usage: release-check.sh TAG OWNER}" | tr '[:upper:]' '[:lower:]')
fail() { echo "release-check: $*" >&2; exit 1; }

# The workspace version: `version = "…"` in [workspace.package] of Cargo.toml.
version=$(awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && $1=="version" {gsub(/"/, "", $3); print $3}' Cargo.toml)
[ -n "$version" ] || fail "no version in [workspace.package] of Cargo.toml"
[ "$tag" = "v$version" ] || fail "tag $tag does not match the workspace version $version (expected v$version)"

chart=charts/mailrelay-operator/Chart.yaml
chart_version=$(sed -n 's/^version:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' "$chart")
app_version=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' "$chart")
[ "$chart_version" = "$version" ] || fail "$chart: version is $chart_version, expected $version"
[ "$app_version" = "$version" ] || fail "$chart: appVersion is $app_version, expected $version"

# `repository:` of a top-level block of values.yaml (image:, relayImage:).
repo_of() {
  awk -v block="$1:" '$0 == block {p=1; next} /^[^[:space:]#]/ {p=0} p && $1 == "repository:" {print $2; exit}' \
    charts/mailrelay-operator/values.yaml
}
values=charts/mailrelay-operator/values.yaml
want_operator="ghcr.io/$owner/mailrelay-operator"
want_relay="ghcr.io/$owner/mailrelay"
[ "$(repo_of image)" = "$want_operator" ] ||
  fail "$values: image.repository is $(repo_of image), but this release pushes $want_operator (run hack/set-image-owner.sh $owner)"
[ "$(repo_of relayImage)" = "$want_relay" ] ||
  fail "$values: relayImage.repository is $(repo_of relayImage), but this release pushes $want_relay (run hack/set-image-owner.sh $owner)"
grep -q "\"$want_relay:\"" operator/src/images.rs ||
  fail "operator/src/images.rs: the default relay image is not $want_relay (run hack/set-image-owner.sh $owner)"

echo "version=$version"
echo "owner=$owner"
