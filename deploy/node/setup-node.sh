#!/usr/bin/env bash
# Prepare a build node for farm (Debian, Ubuntu, Raspberry Pi OS), as root:
#
#   setup-node.sh --authorized-key "ssh-ed25519 AAAA... farm@coordinator" [OPTIONS]
#   setup-node.sh --local [OPTIONS]     # the coordinator's own machine as its local node
#
# What a node needs is small: sshd, python3 3.9 or newer, a builder, and a user farm logs in as.
# This script checks or installs each and says what it did, one line per step:
#   1. python3 >= 3.9 (installed if missing; an older one is an error: farm's agent needs 3.9)
#   2. a builder: docker when a docker daemon already answers (left as it is; the user joins the
#      docker group), else buildah (installed if missing) with what a contained rootless build
#      needs: uidmap (subordinate ids), runc (each RUN step in its own OCI sandbox) and slirp4netns
#      (each RUN step in a network of its own)
#   3. with --emulation only: qemu-user-static and binfmt-support, and the QEMU handlers enabled
#      in binfmt_misc, so this node may also build foreign platforms (slowly)
#   4. the user (default farm; farm-build with --local): created with a home, a login shell (SSH
#      runs commands through it) and no password; subordinate uid/gid ranges for rootless
#      buildah/podman. Builds run as this user: never make it root or give it sudo.
#   5. the coordinator's public key in ~USER/.ssh/authorized_keys, with the `restrict` option
#      (no port, agent or X11 forwarding, no pty: farm needs none of them)
#   6. with --workdir: the agent's work folder (content store, builder storage, build folders),
#      e.g. on a USB SSD rather than a Pi's SD card
#
# Harmless to run again: a step whose work is done prints "skip". --dry-run prints the plan (and
# the commands) without changing anything, and needs no root.
#
# Options:
#   --authorized-key KEY|FILE  the coordinator's public key: a key line, or a file of key lines
#                              (repeatable; required unless --local)
#   --local                    set up the user a root coordinator's local node ('local: true')
#                              builds as (farm-build): no SSH key, farm starts its agent itself
#   --user NAME                the user farm logs in as (default farm)
#   --builder auto|buildah|podman|docker
#                              auto (default): docker if its daemon answers, else buildah
#   --emulation                also install QEMU user emulation and register it in binfmt_misc
#   --workdir DIR              create the agent's workdir (relative to the user's home, or absolute)
#   --dry-run                  print what would be done; change nothing
#   -h, --help                 this text
set -euo pipefail

prog=setup-node.sh
min_python=3.9
user=
local=0
builder=auto
emulation=0
workdir=
dry_run=0
keys=()
key_sources=()

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  exit 1
}
step() { printf '%-10s %s\n' "$1:" "$2"; }

# A change: in a dry run, say what would be done and show the command; else do it, say it is done.
change() {
  local name=$1 what=$2
  shift 2
  if [ "$dry_run" = 1 ]; then
    step "$name" "would $what"
    printf '%-10s   $ %s\n' "" "$(quote "$@")"
  else
    "$@" || die "$name: could not $what (command: $(quote "$@"))"
    step "$name" "$what: done"
  fi
}
quote() {
  local out=() word
  for word in "$@"; do out+=("$(printf '%q' "$word")"); done
  printf '%s' "${out[*]}"
}

# --- arguments ----------------------------------------------------------------------------------
need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
}
while [ $# -gt 0 ]; do
  case $1 in
    --authorized-key)
      need_value "$@"
      key_sources+=("$2")
      shift 2
      ;;
    --authorized-key=*)
      key_sources+=("${1#*=}")
      shift
      ;;
    --user)
      need_value "$@"
      user=$2
      shift 2
      ;;
    --user=*)
      user=${1#*=}
      shift
      ;;
    --builder)
      need_value "$@"
      builder=$2
      shift 2
      ;;
    --builder=*)
      builder=${1#*=}
      shift
      ;;
    --workdir)
      need_value "$@"
      workdir=$2
      shift 2
      ;;
    --workdir=*)
      workdir=${1#*=}
      shift
      ;;
    --emulation)
      emulation=1
      shift
      ;;
    --local)
      local=1
      shift
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case $builder in
  auto | buildah | podman | docker) ;;
  *) die "--builder must be auto, buildah, podman or docker, not '$builder'" ;;
esac
if [ -z "$user" ]; then
  if [ "$local" = 1 ]; then user=farm-build; else user=farm; fi
fi
[[ $user =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "--user '$user' is not a valid user name"
[ "$user" != root ] || die "--user root: builds would run as root; farm's agent runs as an unprivileged user"
[ ${#key_sources[@]} -gt 0 ] || [ "$local" = 1 ] ||
  die "--authorized-key is required: the public key farm's coordinator logs in with (a key line or a file)"

# A key line is "type base64 [comment]"; what identifies the key is "type base64".
key_types='ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh.com|sk-ecdsa-sha2-nistp256@openssh.com'
add_key_line() {
  local line=$1 origin=$2 type blob rest
  read -r type blob rest <<<"$line"
  if ! [[ $type =~ ^($key_types)$ ]]; then
    if [[ " $rest " =~ [[:space:]]($key_types)[[:space:]] ]] || [[ $blob =~ ^($key_types)$ ]]; then
      die "$origin: give the key without options (this script adds 'restrict' itself): '$line'"
    fi
    die "$origin: not an SSH public key line (type base64 [comment]): '$line'"
  fi
  [[ $blob =~ ^AAAA[A-Za-z0-9+/]+={0,3}$ ]] || die "$origin: the key's base64 part is malformed: '$line'"
  # ssh-keygen (openssh-client) decodes the key itself where it is installed.
  if command -v ssh-keygen >/dev/null && ! ssh-keygen -l -f /dev/stdin <<<"$line" >/dev/null 2>&1; then
    die "$origin: ssh-keygen does not accept this public key: '$line'"
  fi
  keys+=("$line")
}
for source in "${key_sources[@]}"; do
  if [ -f "$source" ] && [ -r "$source" ]; then
    found=0
    mapfile -t lines <"$source"
    for line in "${lines[@]}"; do
      [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
      add_key_line "$line" "$source"
      found=1
    done
    [ "$found" = 1 ] || die "$source holds no public key"
  elif [[ $source =~ [[:space:]] ]]; then
    add_key_line "$source" "--authorized-key"
  else
    die "--authorized-key '$source' is neither a public key line nor a readable file"
  fi
done

if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run me as root (sudo $0 ...), or with --dry-run to see the plan"
fi
[ "$dry_run" = 1 ] && echo "dry run: nothing is changed on this machine"

export DEBIAN_FRONTEND=noninteractive

# --- the system ---------------------------------------------------------------------------------
os_id=unknown os_like='' os_name=unknown
if [ -r /etc/os-release ]; then
  # shellcheck disable=SC1091
  os_id=$(. /etc/os-release && echo "${ID:-unknown}")
  # shellcheck disable=SC1091
  os_like=$(. /etc/os-release && echo "${ID_LIKE:-}")
  # shellcheck disable=SC1091
  os_name=$(. /etc/os-release && echo "${PRETTY_NAME:-$os_id}")
fi
case " $os_id $os_like " in
  *" debian "* | *" ubuntu "* | *" raspbian "*) ;;
  *) die "this is $os_name: only Debian, Ubuntu and Raspberry Pi OS (apt and dpkg) are supported" ;;
esac
command -v apt-get >/dev/null || die "apt-get is missing on $os_name"
step system "$os_name, $(uname -m)"

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]; }
packages=() # to install, in one apt-get run
want_package() { installed "$1" || packages+=("$1"); }
apt_install() {
  apt-get update -q >/dev/null ||
    echo "warning: apt-get update failed; installing from the package lists as they are" >&2
  apt-get install -y -q "$@" >/dev/null
}

# --- 1. python3 ---------------------------------------------------------------------------------
python_version() { python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
version_ok() { [ "$(printf '%s\n%s\n' "$min_python" "$1" | sort -V | head -n 1)" = "$min_python" ]; }
python_missing=0
if have=$(python_version); then
  version_ok "$have" || die "python3 is $have; farm's agent needs $min_python or newer (upgrade the OS)"
  step python3 "skip: python3 $have"
else
  python_missing=1
  want_package python3
fi

# --- sshd ---------------------------------------------------------------------------------------
if command -v sshd >/dev/null || [ -x /usr/sbin/sshd ]; then
  step sshd "skip: $(command -v sshd || echo /usr/sbin/sshd) is installed"
else
  want_package openssh-server
fi

# --- 2. the builder -----------------------------------------------------------------------------
docker_answers() { command -v docker >/dev/null && docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if [ "$builder" = auto ]; then
  if docker_answers; then
    builder=docker
  elif command -v buildah >/dev/null; then
    builder=buildah
  elif command -v podman >/dev/null; then
    builder=podman
  else
    builder=buildah
  fi
  step builder "auto: $builder"
fi
case $builder in
  docker)
    docker_answers ||
      die "--builder docker, but no docker daemon answers 'docker version' (install and start docker first)"
    ;;
  buildah | podman)
    want_package "$builder"
    # newuidmap/newgidmap: rootless builds map the user's subordinate ids into a user namespace.
    want_package uidmap
    # runc: every RUN step in its own OCI sandbox (crun fails on hybrid cgroups); slirp4netns:
    # in a network namespace of its own, with outbound access and no way to the node's loopback.
    want_package runc
    want_package slirp4netns
    ;;
esac

# --- 3. emulation (asked for) -------------------------------------------------------------------
if [ "$emulation" = 1 ]; then
  want_package qemu-user-static
  want_package binfmt-support
fi

if [ ${#packages[@]} -eq 0 ]; then
  step packages "skip: everything needed is installed"
else
  change packages "install ${packages[*]}" apt_install "${packages[@]}"
fi
if [ "$python_missing" = 1 ] && [ "$dry_run" = 0 ]; then
  have=$(python_version) || die "python3 does not run after installing it"
  version_ok "$have" || die "python3 is $have; farm's agent needs $min_python or newer"
  step python3 "python3 $have"
fi
if [ "$builder" != docker ] && [ "$dry_run" = 0 ]; then
  command -v "$builder" >/dev/null || die "$builder is not on the PATH after installing it"
fi
[ "$builder" = docker ] && step builder "skip: docker $(docker version --format '{{.Server.Version}}') answers"
if [ "$builder" != docker ] && installed "$builder"; then
  step builder "skip: $builder $("$builder" --version 2>/dev/null | awk '{print $3}')"
fi

binfmt=/proc/sys/fs/binfmt_misc
qemu_handlers() {
  local h out=()
  for h in "$binfmt"/qemu-*; do
    [ -f "$h" ] && [ "$(head -n 1 "$h")" = enabled ] && out+=("${h##*/qemu-}")
  done
  printf '%s' "${out[*]}"
}
if [ "$emulation" = 1 ]; then
  if [ -n "$(qemu_handlers 2>/dev/null)" ]; then
    step binfmt "skip: QEMU handlers enabled: $(qemu_handlers)"
  else
    mountpoint -q "$binfmt" 2>/dev/null ||
      change binfmt "mount binfmt_misc on $binfmt" mount -t binfmt_misc binfmt_misc "$binfmt"
    change binfmt "enable the QEMU handlers" update-binfmts --enable
    if [ "$dry_run" = 0 ]; then
      [ -n "$(qemu_handlers)" ] || die "no QEMU handler is enabled in $binfmt after update-binfmts --enable"
      step binfmt "QEMU handlers enabled: $(qemu_handlers)"
    fi
  fi
  # Builders run foreign binaries inside containers, where the interpreter's host path does not
  # exist: the kernel must have opened it at registration (the F flag). Debian's packages do so.
  for h in "$binfmt"/qemu-*; do
    [ -f "$h" ] || continue
    grep -q '^flags: .*F' "$h" ||
      echo "warning: ${h##*/} has no F flag: foreign binaries will fail inside containers" >&2
  done
fi

# --- 4. the user --------------------------------------------------------------------------------
if entry=$(getent passwd "$user"); then
  IFS=: read -r _ _ uid _ _ home shell <<<"$entry"
  case $shell in
    */nologin | */false | "")
      die "user $user exists with shell '${shell:-none}': farm runs commands over SSH through the login shell (usermod --shell /bin/bash $user)"
      ;;
  esac
  step user "skip: $user exists (uid $uid, home $home, shell $shell)"
else
  home=/home/$user
  # -p '*': no password (not "!", which sshd treats as a locked account when UsePAM is off).
  change user "create user $user (home $home, shell /bin/bash, no password)" \
    useradd --create-home --home-dir "$home" --shell /bin/bash --password '*' \
    --comment "farm build node" "$user"
fi
group=$user
if [ "$dry_run" = 0 ] || getent passwd "$user" >/dev/null; then
  group=$(id -gn "$user")
fi

# Subordinate ids: rootless buildah and podman map 65536 of them into the build's user namespace.
subid_count=65536
has_subids() { grep -q "^$user:" "$1" 2>/dev/null || grep -q "^$(id -u "$user" 2>/dev/null || echo none):" "$1" 2>/dev/null; }
next_subid() {
  # The first free id above every range in /etc/subuid and /etc/subgid, and at least 100000.
  cat /etc/subuid /etc/subgid 2>/dev/null |
    awk -F: 'BEGIN { top = 100000 } NF >= 3 && $2 + $3 > top { top = $2 + $3 } END { print top }'
}
if [ "$builder" = docker ]; then
  if id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx docker; then
    step docker "skip: $user is in group docker"
  else
    echo "note: the docker group gives $user root-equivalent access to this node (as docker does for anyone in it)"
    change docker "add $user to group docker" usermod --append --groups docker "$user"
  fi
elif has_subids /etc/subuid && has_subids /etc/subgid; then
  step subids "skip: $user has subordinate uids and gids"
else
  first=$(next_subid)
  last=$((first + subid_count - 1))
  change subids "give $user subordinate uids and gids $first-$last" \
    usermod --add-subuids "$first-$last" --add-subgids "$first-$last" "$user"
fi
if [ "$builder" != docker ]; then
  # Rootless builds need unprivileged user namespaces; say so now rather than at the first build.
  if [ "$(cat /proc/sys/kernel/unprivileged_userns_clone 2>/dev/null || echo 1)" = 0 ] ||
    [ "$(cat /proc/sys/user/max_user_namespaces 2>/dev/null || echo 1)" = 0 ]; then
    echo "warning: unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone or user.max_user_namespaces): rootless $builder cannot build" >&2
  fi
fi

# --- 5. the authorized key ----------------------------------------------------------------------
ssh_dir=$home/.ssh
authorized=$ssh_dir/authorized_keys
if [ "$local" = 1 ] && [ ${#keys[@]} -eq 0 ]; then
  step ssh "skip: --local (farm starts the agent itself)"
elif [ -d "$ssh_dir" ]; then
  step ssh "skip: $ssh_dir exists"
else
  change ssh "create $ssh_dir (mode 0700)" install -d -m 0700 -o "$user" -g "$group" "$ssh_dir"
fi
if [ "$local" = 1 ] && [ ${#keys[@]} -eq 0 ]; then
  :
elif [ -f "$authorized" ]; then
  step ssh "skip: $authorized exists"
else
  change ssh "create $authorized (mode 0600)" install -m 0600 -o "$user" -g "$group" /dev/null "$authorized"
fi
append_line() { printf '%s\n' "$1" >>"$2"; }
for key in "${keys[@]}"; do
  read -r type blob comment <<<"$key"
  fingerprint=$(ssh-keygen -l -f /dev/stdin <<<"$key" 2>/dev/null | awk '{ print $2 }') ||
    fingerprint=
  fingerprint="$type ${fingerprint:-…${blob: -12}}${comment:+ ($comment)}"
  # The same key is the same type and base64, whatever options or comment its line carries.
  if [ -f "$authorized" ] && awk -v t="$type" -v b="$blob" '
      { for (i = 1; i < NF; i++) if ($i == t && $(i + 1) == b) found = 1 }
      END { exit !found }' "$authorized"; then
    step key "skip: $fingerprint is authorized"
  else
    change key "authorize $fingerprint (restrict)" \
      append_line "restrict $key" "$authorized"
  fi
done

# --- 6. the workdir -----------------------------------------------------------------------------
if [ -n "$workdir" ]; then
  case $workdir in
    /*) path=$workdir ;;
    *) path=$home/$workdir ;;
  esac
  if [ -d "$path" ]; then
    owner=$(stat -c %U "$path")
    [ "$owner" = "$user" ] || die "workdir $path exists but belongs to $owner, not $user"
    step workdir "skip: $path exists, owned by $user"
  else
    change workdir "create $path (mode 0700, owned by $user)" \
      install -d -m 0700 -o "$user" -g "$group" "$path"
  fi
fi

# --- what to put in the coordinator's inventory -------------------------------------------------
[ "$dry_run" = 1 ] && echo "dry run: nothing was changed"
if [ "$local" = 1 ]; then
  cat <<EOF

In the coordinator's inventory (farm runs as root and starts the agent as $user):
  - name: local
    local: true
    user: $user
    builder: $builder
EOF
  exit 0
fi
cat <<EOF

In the coordinator's inventory (or: farm nodes add $(uname -n) --host ADDRESS --user $user):
  - name: $(uname -n)
    host: ADDRESS
    user: $user
    builder: $builder
${workdir:+    workdir: $workdir
}    emulation: $([ "$emulation" = 1 ] && echo true || echo false)
EOF
