#!/usr/bin/env bash
# Build an arm64 Debian bookworm root file system, "a node in a box", for farm's lab: debootstrap
# (first stage on this machine, second stage in a chroot under QEMU), then openssh-server, python3
# and buildah installed with apt-get inside it. tests/sshlab.py starts arm64 nodes from it: each
# node bind-mounts the box onto itself in a private mount namespace and runs the box's own sshd.
#
# Built once: a stamp file in the box records a finished build, and later runs only print "skip"
# lines. Harmless to run again and to run concurrently (a lock serialises builds). An interrupted
# build carries on where it stopped, except that a debootstrap stage that did not finish (first or
# second) starts over from an empty box.
#
# All mounts this script makes (/proc, /dev, resolv.conf for apt) live in a private mount namespace
# (unshare --mount) that ends with the step, so nothing stays mounted even when a step is killed.
#
# Network: only the Debian mirror(s) this machine's apt already uses (apt-get indextargets).
#
# Environment:
#   FARM_ARM64_BOX      where the box lives (default /var/cache/farm-lab/arm64-bookworm)
#   FARM_DEBIAN_MIRROR  the Debian mirror for debootstrap (default: this machine's bookworm source)
# Snippets in single quotes expand later (in the box's mount namespace, or in apt): on purpose.
# shellcheck disable=SC2016
set -euo pipefail

box=${FARM_ARM64_BOX:-/var/cache/farm-lab/arm64-bookworm}
suite=bookworm
arch=arm64
# What deploy/node/setup-node.sh wants of a buildah node (runc, slirp4netns, uidmap: contained
# rootless builds), so that its run in the box installs nothing.
packages=(openssh-server python3 buildah runc slirp4netns uidmap)
# Folders that tests/sshlab.py mounts per node over the box (so the box itself stays unchanged).
mountpoints=(etc/farm-node var/lib/farm var/lib/containers)
# Change when the recipe changes: a box built by an older recipe is rebuilt from scratch.
recipe="farm-arm64-box v2: debootstrap --variant=minbase $suite $arch; apt-get install ${packages[*]}"
stamp=$box/.farm-box-complete
stage1=$box/.farm-stage1-complete
stage2=$box/.farm-stage2-complete
stage2_started=$box/.farm-stage2-started

export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

step() { printf '%-11s %s\n' "$1:" "$2"; }
die() {
  printf 'arm64-box.sh: error: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "run me as root (sudo $0)"
for tool in debootstrap unshare chroot flock apt-get; do
  command -v "$tool" >/dev/null || die "$tool is missing; run deploy/lab/setup.sh first"
done

mkdir -p "$(dirname "$box")"
log=$box.log
# The lock is fd 9; commands started below get it closed (9>&-), so that a process left over
# from a killed build cannot hold the lock.
exec 9>"$box.lock"
if ! flock -n 9; then
  step lock "another arm64-box.sh is building $box; waiting for it"
  flock 9
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
  step box "skip: $box is complete ($(du -sh --one-file-system "$box" 2>/dev/null | cut -f 1))"
  exit 0
fi

# --- QEMU: the second stage and apt run arm64 binaries --------------------------------------------
binfmt=/proc/sys/fs/binfmt_misc
if [ -f "$binfmt/qemu-aarch64" ] && [ "$(head -n 1 "$binfmt/qemu-aarch64")" = enabled ]; then
  step qemu "skip: qemu-aarch64 enabled in binfmt_misc"
else
  mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt"
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  if [ ! -f "$binfmt/qemu-aarch64" ] || [ "$(head -n 1 "$binfmt/qemu-aarch64")" != enabled ]; then
    die "qemu-aarch64 is not enabled in $binfmt (is qemu-user-static installed? run deploy/lab/setup.sh)"
  fi
  step qemu "enabled qemu-aarch64 in binfmt_misc"
fi
grep -q '^flags: .*F' "$binfmt/qemu-aarch64" ||
  die "qemu-aarch64 has no F flag: arm64 binaries would not run inside the chroot"

# --- the mirror: the same Debian sources this machine's apt uses ------------------------------------
# "URI RELEASE" for every Debian source of this suite the host's apt knows (main, -updates, -security).
mapfile -t sources < <(
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
    awk -v s="$suite" '$2 == s || $2 == s "-updates" || $2 == s "-security"' | sort -u
)
mirror=${FARM_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  for line in "${sources[@]}"; do
    [ "${line#* }" = "$suite" ] && mirror=${line%% *} && break
  done
fi
[ -n "$mirror" ] || die "no Debian $suite source in this machine's apt configuration; set FARM_DEBIAN_MIRROR"
[ ${#sources[@]} -gt 0 ] || sources=("$mirror $suite")
step mirror "$mirror (box sources: ${#sources[@]})"

# Nothing may be mounted under the box when it is deleted (rm would follow into /dev or /proc).
mounted_under_box() { awk -v b="$box/" 'index($5 "/", b) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# --- debootstrap, first stage (on this machine: downloads and unpacks) -----------------------------
# A second stage that started and did not finish cannot be resumed: then start over.
if [ -f "$stage1" ] && [ "$(cat "$stage1")" = "$recipe" ] && { [ -f "$stage2" ] || [ ! -e "$stage2_started" ]; }; then
  step stage1 "skip: first stage done"
else
  if mounted_under_box; then
    die "something is mounted under $box (a running arm64 node?); stop it before rebuilding the box"
  fi
  rm -rf --one-file-system "$box"
  mkdir -p "$box"
  started=$SECONDS
  debootstrap --arch="$arch" --variant=minbase --foreign "$suite" "$box" "$mirror" >"$log" 2>&1 9>&- ||
    die "debootstrap first stage failed; see $log"
  echo "$recipe" >"$stage1"
  step stage1 "debootstrap --foreign $suite $arch into $box ($((SECONDS - started)) s)"
fi

# Run a bash snippet with the box's /proc, /dev and the host's resolver mounted, in a private mount
# namespace: the mounts end with the snippet.
in_box() {
  unshare --mount --propagation private -- bash -euo pipefail -c '
    box=$1
    shift
    mount -t proc proc "$box/proc"
    mount --rbind /dev "$box/dev"
    mount -t sysfs sysfs "$box/sys"
    for f in resolv.conf hosts; do
      [ -e "$box/etc/$f" ] || : >"$box/etc/$f"
      mount --bind "/etc/$f" "$box/etc/$f"
    done
    eval "$1"
  ' in_box "$box" "$1" 9>&-
}

# --- debootstrap, second stage (in the chroot, under QEMU) ------------------------------------------
if [ -f "$stage2" ] && [ "$(cat "$stage2")" = "$recipe" ]; then
  step stage2 "skip: second stage done"
else
  started=$SECONDS
  touch "$stage2_started"
  # The second stage mounts /proc itself; a private mount namespace keeps that from leaking.
  if ! unshare --mount --propagation private -- chroot "$box" /debootstrap/debootstrap --second-stage \
    >>"$log" 2>&1 9>&-; then
    die "debootstrap second stage failed (the next run starts over); see $log"
  fi
  echo "$recipe" >"$stage2"
  step stage2 "debootstrap --second-stage under QEMU ($((SECONDS - started)) s)"
fi

# --- packages ------------------------------------------------------------------------------------
started=$SECONDS
{
  for line in "${sources[@]}"; do
    echo "deb ${line%% *} ${line#* } main"
  done
} >"$box/etc/apt/sources.list"
# Packages must not start services in the box while they are installed (sshd would listen on this
# machine's port 22): 101 = "action forbidden". Kept: the box never runs init scripts.
printf '#!/bin/sh\nexit 101\n' >"$box/usr/sbin/policy-rc.d"
chmod 0755 "$box/usr/sbin/policy-rc.d"
# dpkg --configure -a: finishes what an interrupted earlier run left half-installed.
in_box "chroot \"\$box\" dpkg --configure -a && chroot \"\$box\" apt-get update -q && \
  chroot \"\$box\" apt-get install -y -q \
  --no-install-recommends ${packages[*]} && chroot \"\$box\" apt-get clean" >>"$log" 2>&1 ||
  die "apt-get install ${packages[*]} in the box failed; see $log"
step packages "installed ${packages[*]} ($((SECONDS - started)) s)"

# --- what tests/sshlab.py needs in the box ----------------------------------------------------------
for dir in "${mountpoints[@]}"; do
  mkdir -p "$box/$dir"
done
# sshd refuses a locked account ("!" in shadow) when it does not use PAM; "*" allows keys only.
sed -i 's/^root:![^:]*:/root:*:/' "$box/etc/shadow"
step layout "mount points ${mountpoints[*]}; root may log in with a key"

# --- check: what an SSH session in the box will see ----------------------------------------------
machine=$(in_box 'chroot "$box" uname -m')
py=$(in_box "chroot \"\$box\" python3 -c 'import platform; print(platform.machine(), platform.python_version())'")
buildah=$(in_box 'chroot "$box" buildah --version 2>/dev/null')
sshd=$(in_box 'chroot "$box" /usr/sbin/sshd -V 2>&1 || true' | head -n 1)
[ "$machine" = aarch64 ] || die "uname -m in the box printed '$machine', expected aarch64"
[ "${py%% *}" = aarch64 ] || die "python3 in the box reports '$py', expected aarch64"
step check "uname -m: $machine; python3: $py; $buildah; $sshd"

echo "$recipe" >"$stamp"
step box "complete: $box ($(du -sh --one-file-system "$box" | cut -f 1))"
