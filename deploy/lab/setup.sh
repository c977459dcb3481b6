#!/usr/bin/env bash
# Bring up farm's lab on one Debian 12 x86_64 machine, as root: packages, QEMU through
# binfmt_misc, the project's virtual environment, a multi-platform busybox base image made from
# Debian packages (there is no Docker Hub here), a plain-HTTP registry on 127.0.0.1:5000 seeded
# with it, and a dockerd that runs foreign-platform images under QEMU.
#
# Harmless to run again: every step checks whether its work is already done and then only prints
# one "skip" line. State (logs, pid files, registry data, docker data) lives in
# ${FARM_LAB_STATE:-<repo>/.lab}; deploy/lab/stop.sh stops what this script started.
#
# Environment:
#   FARM_LAB_STATE           state folder (default <repo>/.lab)
#   FARM_LAB_DOCKER_STORAGE  dockerd storage driver (default vfs: works on any file system)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${FARM_LAB_STATE:-$repo/.lab}

registry_addr=127.0.0.1:5000
registry_dir=$state/registry
seed_ref=localhost:5000/library/busybox:latest
layout=$state/busybox-oci
debs=$state/debs
docker_sock=/var/run/docker.sock
docker_storage=${FARM_LAB_DOCKER_STORAGE:-vfs}

# golang-github-opencontainers-image-spec-dev: the OCI image-spec's JSON schemas, which the tests
# validate every index farm writes against. shellcheck and systemd (systemd-analyze): the checks
# of deploy/'s scripts and unit.
# runc, slirp4netns, uidmap: contained rootless builds (each RUN step in an OCI sandbox with a
# network of its own, as the unprivileged farm-build user). gcc and libc6-dev: the containment
# tests compile a static probe that tries to escape.
packages=(
  qemu-user-static binfmt-support buildah skopeo docker-registry openssh-server docker.io
  debootstrap prometheus apache2-utils iproute2 python3-venv python3-pip curl
  golang-github-opencontainers-image-spec-dev shellcheck systemd chromium
  runc slirp4netns uidmap gcc libc6-dev
)
# Debian architecture -> what we need from it; amd64 is native, the rest are foreign.
foreign_archs=(arm64 armhf armel s390x ppc64el i386)
qemu_handlers=(qemu-aarch64 qemu-arm qemu-s390x qemu-ppc64le)

export DEBIAN_FRONTEND=noninteractive
# needrestart (recommended by docker.io) must not restart services in the middle of a set-up.
export NEEDRESTART_SUSPEND=1

step() { printf '%-9s %s\n' "$1:" "$2"; }
die() {
  printf 'setup.sh: error: %s\n' "$*" >&2
  exit 1
}

# Poll "$@" every 0.25 s for at most $1 seconds; fail early when pid $2 (if given) has died.
wait_for() {
  local seconds=$1 pid=$2
  shift 2
  local tries=$((seconds * 4))
  while ((tries-- > 0)); do
    "$@" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    sleep 0.25
  done
  "$@"
}

# apt-get update, tolerating a partly failed update: the foreign-architecture security indexes of
# a mirror being synced are sometimes inconsistent, and nothing here needs them. What does need an
# index fails right after, with apt's own message.
apt_update() {
  if ! apt-get update -q >>"$state/apt.log" 2>&1; then
    echo "  (apt-get update reported errors, carrying on; see $state/apt.log)"
  fi
}

policy_rc_d=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
  if [ "$created_policy" = 1 ]; then
    rm -f "$policy_rc_d"
    created_policy=0
  fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run me as root (sudo $0)"
mkdir -p "$state"

# --- a. Debian packages ------------------------------------------------------------------------
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  step apt "skip: all ${#packages[@]} packages installed"
else
  step apt "installing ${missing[*]}"
  # Keep maintainer scripts from starting docker, containerd, docker-registry or prometheus: we
  # start what we need ourselves, with our own configuration. 101 = "action forbidden".
  if [ ! -e "$policy_rc_d" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc_d"
    chmod 0755 "$policy_rc_d"
    created_policy=1
  fi
  apt_update
  apt-get install -y -q "${missing[@]}" >>"$state/apt.log" 2>&1 ||
    die "apt-get install failed; see $state/apt.log"
  cleanup
fi

# The package's registry service uses its default config (every interface, htpasswd auth): never
# leave it running, or it holds port 5000. Under systemd it is also disabled so a reboot does not
# bring it back.
if [ -d /run/systemd/system ]; then
  if systemctl is-active --quiet docker-registry.service ||
    systemctl is-enabled --quiet docker-registry.service 2>/dev/null; then
    systemctl disable --now --quiet docker-registry.service
    step pkg-reg "stopped and disabled the package's docker-registry service"
  else
    step pkg-reg "skip: the package's docker-registry service is not running"
  fi
elif /etc/init.d/docker-registry status >/dev/null 2>&1; then
  /etc/init.d/docker-registry stop >/dev/null
  step pkg-reg "stopped the package's docker-registry service"
else
  step pkg-reg "skip: the package's docker-registry service is not running"
fi

# --- b. QEMU through binfmt_misc ---------------------------------------------------------------
binfmt=/proc/sys/fs/binfmt_misc
binfmt_ready() {
  local h
  mountpoint -q "$binfmt" || return 1
  for h in "${qemu_handlers[@]}"; do
    [ -f "$binfmt/$h" ] && [ "$(head -n 1 "$binfmt/$h")" = enabled ] || return 1
  done
}
if binfmt_ready; then
  step binfmt "skip: ${qemu_handlers[*]} enabled"
else
  mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt"
  update-binfmts --enable
  for h in "${qemu_handlers[@]}"; do
    [ -f "$binfmt/$h" ] ||
      die "$h is not registered in $binfmt after update-binfmts --enable (is qemu-user-static installed?)"
    [ "$(head -n 1 "$binfmt/$h")" = enabled ] || die "$h is registered but disabled in $binfmt"
  done
  step binfmt "enabled ${qemu_handlers[*]}"
fi
# Containers and chroots do not have the interpreter at its host path: the handler must have been
# registered with the F (fix binary) flag, which makes the kernel open it at registration time.
for h in "${qemu_handlers[@]}"; do
  grep -q '^flags: .*F' "$binfmt/$h" ||
    die "$h has no F flag in $binfmt/$h: foreign binaries would fail inside containers"
done

# --- b2. the unprivileged user the local node builds as ------------------------------------------
# farm runs here as root; its local node's agent (and every build) runs as farm-build, with a
# rootless buildah. setup-node.sh says "skip" for each part already in place.
"$repo/deploy/node/setup-node.sh" --local --builder buildah | sed 's/^/  /'

# --- c. Python virtual environment -------------------------------------------------------------
venv=$repo/.venv
stamp=$state/pyproject.sha256
pyproject_sum=$(sha256sum "$repo/pyproject.toml" | cut -d ' ' -f 1)
fresh_venv=0
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  fresh_venv=1
fi
if [ "$fresh_venv" = 0 ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$pyproject_sum" ]; then
  step venv "skip: $venv up to date with pyproject.toml"
else
  "$venv/bin/pip" install -q -e "${repo}[dev]" >"$state/pip.log" 2>&1 ||
    die "pip install -e '${repo}[dev]' failed; see $state/pip.log"
  echo "$pyproject_sum" >"$stamp"
  step venv "installed ${repo}[dev] into $venv"
fi
# An editable install is not byte-compiled, and where PYTHONDONTWRITEBYTECODE is set nothing writes
# the bytecode later either: every farm command would compile its modules again (~50 ms each run).
"$venv/bin/python" -m compileall -q "$repo/farm" "$repo/agent" >/dev/null

# --- d. busybox base image as an OCI layout ----------------------------------------------------
# Rebuilt when missing, or when busybox_layout.py changed since it was written (a stamp beside it).
layout_stamp=$state/busybox-oci.sha256
layout_want=$(sha256sum "$here/busybox_layout.py" | cut -d ' ' -f 1)
if [ -f "$layout/index.json" ] && [ "$(cat "$layout_stamp" 2>/dev/null || true)" = "$layout_want" ]; then
  step base "skip: $layout exists"
else
  for a in "${foreign_archs[@]}"; do
    dpkg --print-foreign-architectures | grep -qx "$a" || dpkg --add-architecture "$a"
  done
  mkdir -p "$debs"
  need=()
  for a in amd64 "${foreign_archs[@]}"; do
    compgen -G "$debs/busybox-static_*_$a.deb" >/dev/null || need+=("busybox-static:$a")
  done
  if [ ${#need[@]} -gt 0 ]; then
    # A newly added architecture has no index yet: then the first try fails, we update, retry.
    download() { (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${need[@]}"); }
    if ! download >>"$state/apt.log" 2>&1; then
      apt_update
      download >>"$state/apt.log" 2>&1 || die "apt-get download ${need[*]} failed; see $state/apt.log"
    fi
  fi
  digest=$(python3 "$here/busybox_layout.py" "$debs" "$layout") || die "busybox_layout.py failed"
  echo "$layout_want" >"$layout_stamp"
  step base "wrote $layout ($digest)"
fi

# --- e. registry on 127.0.0.1:5000 -------------------------------------------------------------
registry_up() { curl -fsS -o /dev/null --max-time 2 "http://$registry_addr/v2/" 2>/dev/null; }
if registry_up; then
  step registry "skip: http://$registry_addr/v2/ answers"
else
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$registry_addr/v2/" || true)
  [ "$code" = 000 ] ||
    die "something else answers on $registry_addr (HTTP $code to /v2/); stop it first"
  mkdir -p "$registry_dir/data"
  cat >"$registry_dir/config.yml" <<EOF
# Written by deploy/lab/setup.sh. Loopback only, no auth, deletes allowed (tests clean up).
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: "$registry_dir/data"
  delete:
    enabled: true
http:
  addr: $registry_addr
EOF
  setsid nohup docker-registry serve "$registry_dir/config.yml" \
    >>"$registry_dir/registry.log" 2>&1 </dev/null &
  echo $! >"$registry_dir/registry.pid"
  wait_for 15 "$!" registry_up ||
    die "the registry did not answer on http://$registry_addr/v2/ within 15 s; see $registry_dir/registry.log"
  step registry "started on $registry_addr (pid $(cat "$registry_dir/registry.pid"))"
fi

# --- f. seed the registry ----------------------------------------------------------------------
want=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
  "$layout/index.json")
seeded_digest() {
  local raw
  raw=$(skopeo inspect --raw --tls-verify=false "docker://$seed_ref" 2>/dev/null) || return 0
  printf 'sha256:%s' "$(printf '%s' "$raw" | sha256sum | cut -d ' ' -f 1)"
}
if [ "$(seeded_digest)" = "$want" ]; then
  step seed "skip: $seed_ref is $want"
else
  skopeo copy -q --all --preserve-digests --dest-tls-verify=false \
    "oci:$layout:latest" "docker://$seed_ref" >/dev/null
  have=$(seeded_digest)
  [ "$have" = "$want" ] || die "after skopeo copy, $seed_ref is '$have', expected $want"
  step seed "pushed $seed_ref ($want)"
fi

# --- g. dockerd --------------------------------------------------------------------------------
# The docker client on the PATH may be newer than Debian's dockerd 20.10 (API 1.41). Clients
# negotiate the API version down by themselves; DOCKER_API_VERSION is only needed by clients that
# do not, and then must be 1.41.
docker_up() { docker info >/dev/null 2>&1; }
if docker_up; then
  step dockerd "skip: docker info answers"
else
  mkdir -p "$state/docker" "$state/docker-exec"
  # --iptables=false --bridge=none: no host firewall or bridge changes; containers that need a
  # network use --network host. vfs: slow for big images, but works on any file system.
  setsid nohup dockerd --iptables=false --bridge=none --storage-driver="$docker_storage" \
    --data-root "$state/docker" --exec-root "$state/docker-exec" \
    --pidfile "$state/dockerd.pid" -H "unix://$docker_sock" \
    >>"$state/dockerd.log" 2>&1 </dev/null &
  wait_for 30 "$!" docker_up ||
    die "dockerd did not answer docker info within 30 s; see $state/dockerd.log"
  step dockerd "started on unix://$docker_sock (pid $(cat "$state/dockerd.pid"))"
fi

# A real client resolving the seeded index to the right child, under QEMU. Checked once per
# (index digest, dockerd) pair: a second run need not pull and start containers again.
docker_id=$(docker info --format '{{.ID}}')
check_key="$want $docker_id $(cat "$state/dockerd.pid" 2>/dev/null || true)"
if [ "$(cat "$state/docker-check" 2>/dev/null || true)" = "$check_key" ]; then
  step check "skip: docker run of arm/v7 and s390x already checked"
else
  for pair in linux/arm/v7=armv7l linux/s390x=s390x; do
    platform=${pair%=*} expect=${pair#*=}
    got=$(docker run --rm --pull always --platform "$platform" "$seed_ref" uname -m 2>&1 | tail -n 1) ||
      true
    [ "$got" = "$expect" ] ||
      die "docker run --platform $platform $seed_ref uname -m printed '$got', expected $expect"
  done
  echo "$check_key" >"$state/docker-check"
  step check "docker run --platform linux/arm/v7 -> armv7l, linux/s390x -> s390x"
fi

# --- h. what is running ------------------------------------------------------------------------
registry_pid=$(cat "$registry_dir/registry.pid" 2>/dev/null || echo "not started by setup.sh")
dockerd_pid=$(cat "$state/dockerd.pid" 2>/dev/null || echo "not started by setup.sh")
cat <<EOF

Lab is up.
  registry  http://$registry_addr  (pid $registry_pid; log $registry_dir/registry.log)
            seeded: $seed_ref  ($want)
  dockerd   unix://$docker_sock  (pid $dockerd_pid; log $state/dockerd.log)
  venv      $venv  (. $venv/bin/activate)
  buildah   buildah --storage-driver vfs bud --isolation chroot --platform linux/arm64 --tls-verify=false ...
  docker    DOCKER_BUILDKIT=0 docker build --network host --platform linux/arm64 ...
Stop with: ${FARM_LAB_STATE:+FARM_LAB_STATE=$state }$here/stop.sh
EOF
