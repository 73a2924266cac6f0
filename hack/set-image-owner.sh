#!/usr/bin/env bash
# Points every default image and project link at another GitHub owner (a fork, or
# the project moving): ghcr.io/<old>/mailrelay… → ghcr.io/<new>/mailrelay…, and
# github.com/<old>/mailrelay → github.com/<new>/mailrelay. Commit the result; the
# release workflow refuses to publish when the defaults name another owner.
#
#   hack/set-image-owner.sh my-org
set -euo pipefail
cd "$(dirname "$0")/.."
new=$(printf '%s' "${1:?usage: set-image-owner.sh OWNER}" | tr '[:upper:]' '[:lower:]')
old=$(sed -n 's#.*"ghcr\.io/\([^/]*\)/mailrelay:".*#\1#p' operator/src/images.rs | head -n1)
[ -n "$old" ] || { echo "set-image-owner: no current owner in operator/src/images.rs" >&2; exit 1; }
[ "$old" != "$new" ] || { echo "already $new"; exit 0; }
git grep -lz -e "ghcr.io/$old/mailrelay" -e "github.com/$old/mailrelay" -- . ':!*.lock' |
  xargs -0 sed -i -e "s#ghcr\.io/$old/mailrelay#ghcr.io/$new/mailrelay#g" \
                  -e "s#github\.com/$old/mailrelay#github.com/$new/mailrelay#g"
echo "images and links now name $new (was $old)"
