#!/usr/bin/env bash
# The main job, end to end on this machine: set up the lab, build examples/hello for seven
# platforms with farm on the embedded default inventory (this machine, QEMU for foreign
# platforms), then run the result as each platform with a real docker client.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${FARM_LAB_STATE:-$repo/.lab}
image=localhost:5000/examples/hello:latest
platforms=(linux/amd64 linux/arm64 linux/arm/v7 linux/arm/v6 linux/s390x linux/ppc64le linux/386)

"$here/setup.sh"
cd "$repo"
unset FARM_INVENTORY
.venv/bin/farm build -t "$image" --platform "$(IFS=,; echo "${platforms[*]}")" \
  --metadata-file "$state/hello-metadata.json" examples/hello

echo
echo "docker run --platform P $image:"
for platform in "${platforms[@]}"; do
  printf '  %-14s %s\n' "$platform" "$(docker run --rm --quiet --pull always --platform "$platform" "$image")"
done
