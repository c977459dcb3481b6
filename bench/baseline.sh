#!/usr/bin/env bash
# The multi-platform build a careful user would write by hand with buildah, contained as farm
# contains its builds: build and push every platform in parallel, wait for all of them, then make
# a manifest list of the pushed images and push it.
# This is the baseline farm is measured against (bench/local_build.py runs it).
#
# Containment, as farm's local node has it (README, "Security"; agent/builders.py): run this
# script as the unprivileged build user (bench/local_build.py runs it as farm-build, started with
# setpriv and the same environment farm gives its agent); buildah is then rootless, in a user
# namespace of its own; each platform's `buildah bud` goes through contained-bud.sh, which puts
# the builder in a PID namespace of its own and runs every RUN step under
# `--isolation oci --runtime runc` in a network namespace of its own behind slirp4netns. The bud
# flags are farm's agent's: --layers (farm keeps intermediate images as the next build's cache;
# BASELINE_LAYERS=0 drops it), --platform, plain HTTP to the registry.
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
#   BUILDAH_DRIVER                 storage driver (default: buildah's); the benchmark passes the one
#                                  farm's agent picks on this machine
#   BASELINE_LAYERS                1 (default): bud --layers, as farm's agent; 0: without
set -euo pipefail

[ $# -eq 4 ] || {
  echo "usage: $0 REPO TAG PLATFORMS CONTEXT" >&2
  exit 2
}
repo=$1 tag=$2 platforms=$3 context=$4
here=$(cd "$(dirname "$0")" && pwd)

storage=()
[ -n "${BUILDAH_ROOT:-}" ] && storage+=(--root "$BUILDAH_ROOT")
[ -n "${BUILDAH_RUNROOT:-}" ] && storage+=(--runroot "$BUILDAH_RUNROOT")
[ -n "${BUILDAH_DRIVER:-}" ] && storage+=(--storage-driver "$BUILDAH_DRIVER")
b() { buildah "${storage[@]}" "$@"; }
layers=()
[ "${BASELINE_LAYERS:-1}" = 1 ] && layers=(--layers)

IFS=, read -r -a list <<<"$platforms"

pids=()
images=()
for platform in "${list[@]}"; do
  image="$repo:$tag-${platform//\//-}"
  images+=("$image")
  {
    bash "$here/contained-bud.sh" "${storage[@]}" -- "${layers[@]}" --platform "$platform" \
      --tls-verify=false -t "$image" "$context" &&
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
