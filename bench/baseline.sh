#!/usr/bin/env bash
# The multi-platform build a user would write by hand with buildah: build and push every platform
# in parallel, wait for all of them, then make a manifest list of the local images and push it.
# This is the baseline farm is measured against (bench/local_build.py runs it).
#
# usage: bench/baseline.sh REPO TAG PLATFORMS CONTEXT
#   REPO       registry repository, e.g. localhost:5000/bench/baseline
#   TAG        tag of the index; each platform's image is pushed as TAG-<os>-<arch>[-<variant>]
#   PLATFORMS  comma separated, e.g. linux/amd64,linux/arm64,linux/arm/v7
#   CONTEXT    build context folder holding the Dockerfile
#
# Environment:
#   BUILDAH_ROOT, BUILDAH_RUNROOT  buildah storage (default: buildah's own defaults); the benchmark
#                                  points them at a fresh folder each round
set -euo pipefail

[ $# -eq 4 ] || {
  echo "usage: $0 REPO TAG PLATFORMS CONTEXT" >&2
  exit 2
}
repo=$1 tag=$2 platforms=$3 context=$4

storage=(--storage-driver vfs)
[ -n "${BUILDAH_ROOT:-}" ] && storage+=(--root "$BUILDAH_ROOT")
[ -n "${BUILDAH_RUNROOT:-}" ] && storage+=(--runroot "$BUILDAH_RUNROOT")
b() { buildah "${storage[@]}" "$@"; }

IFS=, read -r -a list <<<"$platforms"

pids=()
images=()
for platform in "${list[@]}"; do
  image="$repo:$tag-${platform//\//-}"
  images+=("$image")
  {
    b bud --isolation chroot --platform "$platform" --tls-verify=false -t "$image" "$context" &&
      b push --tls-verify=false "$image"
  } &
  pids+=($!)
done

failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "baseline: ${list[$i]} failed" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1

b manifest create "$repo:$tag"
for image in "${images[@]}"; do
  b manifest add "$repo:$tag" "$image"
done
b manifest push --all --tls-verify=false "$repo:$tag" "docker://$repo:$tag"
