#!/usr/bin/env bash
# One `buildah bud` contained the way farm's agent contains a build (agent/builders.py,
# _build_with_containers_tools and _contained), for the benchmarks' hand-written sides:
#
#   - rootless when run by an unprivileged user: the builder runs in its own user namespace
#     (`buildah unshare`), as farm's agent does on every node it logs in to as the build user;
#   - the builder in a PID namespace of its own (`unshare --pid --fork --kill-child`);
#   - every RUN step under `--isolation oci --runtime runc`, in a network namespace of its own
#     whose outbound traffic goes through slirp4netns (`--disable-host-loopback`: no way to the
#     node's loopback services), with slirp4netns's DNS forwarder.
#
# buildah's own rootless networking (1.28, netavark) fails on this machine
# ("netavark: setns: ... Operation not permitted"), which is why farm's agent, and this script,
# make the namespace themselves and hand it to buildah with `--network ns:PATH`.
#
# usage: contained-bud.sh BUILDAH-GLOBAL-FLAGS... -- BUD-FLAGS... CONTEXT
#   e.g. contained-bud.sh --root R --runroot RR --storage-driver overlay -- \
#          --layers --platform linux/arm64 --tls-verify=false -t IMAGE CONTEXT
# The script adds --isolation oci --runtime RUNC --network ns:... --dns 10.0.2.3 to BUD-FLAGS.
set -euo pipefail

global=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  global+=("$1")
  shift
done
[ $# -gt 1 ] || {
  echo "usage: $0 BUILDAH-GLOBAL-FLAGS... -- BUD-FLAGS... CONTEXT" >&2
  exit 2
}
shift

if [ "${_BENCH_CONTAINED:-}" != 1 ]; then
  contain=(env _BENCH_CONTAINED=1 unshare --pid --fork --kill-child --mount-proc -- bash "$0" "${global[@]}" -- "$@")
  if [ "$(id -u)" = 0 ]; then
    exec "${contain[@]}"
  fi
  exec buildah "${global[@]}" unshare -- "${contain[@]}"
fi

runc=$(command -v runc) || {
  echo "contained-bud: no runc" >&2
  exit 125
}
# The network namespace, held open by a child until this script ends (it is PID 1 of its PID
# namespace: everything in it dies with it, slirp4netns included).
coproc holder { exec unshare --net -- sh -c 'echo ready; exec cat >/dev/null'; }
holder_pid=${holder_PID:?}
read -r _ <&"${holder[0]}"
ready=$(mktemp -u "${TMPDIR:-/tmp}/contained-bud-ready.XXXXXX")
mkfifo -m 600 "$ready"
slirp4netns --configure --mtu=65520 --disable-host-loopback --ready-fd=3 "$holder_pid" tap0 3>"$ready" >/dev/null &
read -r -n1 ok <"$ready" || ok=
rm -f "$ready"
[ "$ok" = 1 ] || {
  echo "contained-bud: slirp4netns could not give the build its network" >&2
  exit 125
}
buildah "${global[@]}" bud --isolation oci --runtime "$runc" \
  --network "ns:/proc/$holder_pid/ns/net" --dns 10.0.2.3 "$@"
