"""Builder backends: build a Dockerfile for one platform and export the image as an OCI layout.

Each backend runs its commands through a ``Runner``, which puts every command in its own process
group so that a cancelled build can be killed whole (buildah's and docker's children included).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import IO, Callable

__all__ = [
    "ISOLATIONS",
    "NETWORKS",
    "BuildSpec",
    "BuilderFailed",
    "Cancelled",
    "Runner",
    "clear_leftovers",
    "export_image",
    "oci_runtime",
    "private_network_ready",
    "storage_command",
    "storage_driver",
    "tidy_store",
]

# How a RUN step is kept from the node: "oci" runs it in its own PID, mount, IPC, UTS and network
# namespaces under runc; "chroot" only changes its root (as root, no sandbox at all: see README).
ISOLATIONS = ("oci", "chroot")
# A RUN step's network, by buildx's names: "default" is a namespace of its own with outbound
# access through slirp4netns and no view of the node's interfaces or loopback services; "host" is
# the node's own; "none" is none at all.
NETWORKS = ("default", "host", "none")
# slirp4netns's fixed addresses: its DNS forwarder in the namespace it serves.
_SLIRP_DNS = "10.0.2.3"

LOG_TAIL = 30
_KILL_GRACE = 5.0


class BuilderFailed(Exception):
    """A builder command exited non-zero; ``tail`` holds its last lines of output."""

    def __init__(self, message: str, tail: Sequence[str], signalled: bool = False) -> None:
        super().__init__(message)
        self.tail = list(tail)
        self.signalled = signalled

    @property
    def node_at_fault(self) -> bool:
        """The node failed the build, not the Dockerfile: the builder crashed (killed by a
        signal) or the node ran out of disk. Another node may well succeed."""
        text = "\n".join(self.tail).lower()
        return self.signalled or any(sign in text for sign in _NODE_FAULT_SIGNS)


_NODE_FAULT_SIGNS = ("no space left on device", "disk quota exceeded", "cannot allocate memory")


class Cancelled(Exception):
    pass


# A killed agent, even by SIGKILL, leaves no builder behind. Every builder command leads a process
# group of its own (cancelling kills the group) and gets SIGKILL from the kernel when the agent dies
# (PR_SET_PDEATHSIG, set by ``setpriv`` from util-linux before it execs the command; strictly, when
# the agent's thread that started it ends: ``Runner.run`` waits in that thread). ``sh`` then checks
# that its parent is still the agent, as the signal would not come if the agent died before it was
# set, and execs the command: no process stays around it. The signal reaches the command alone, not
# what it starts: rootless buildah re-execs itself into its user namespace with a parent-death
# signal of its own, and a contained build's PID namespace is tied to its parent the same way (see
# ``_contained``), the namespace's end ending everything in it.
_IF_PARENT = 'test "$PPID" = "$0" && exec "$@"'

# Where setpriv cannot set a parent-death signal (util-linux before 2.33, or none), a Python guard
# does the same for the whole process group: the kernel signals it when the agent dies and it kills
# the group. It costs a Python start per command (about 20 ms of CPU).
_GUARD = """\
import ctypes, os, signal, subprocess, sys
def kill_group(*_):
    os.killpg(os.getpgrp(), signal.SIGKILL)
signal.signal(signal.SIGUSR1, kill_group)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    kill_group()
code = subprocess.call(sys.argv[2:])
if code < 0:  # die of the same signal, so that the agent sees how the builder ended
    if -code == signal.SIGUSR1:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""

_setpriv_probe: list[str | None] = []


def _setpriv() -> str | None:
    """``setpriv``, if it can give a command a parent-death signal here; asked once per agent."""
    if not _setpriv_probe:
        found = shutil.which("setpriv")
        if found is not None:
            try:
                probe = subprocess.run(
                    [found, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", ":"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=30,
                )
                if probe.returncode != 0:
                    found = None
            except (OSError, subprocess.TimeoutExpired):
                found = None
        _setpriv_probe.append(found)
    return _setpriv_probe[0]


def _tied_to_agent(argv: list[str]) -> list[str]:
    """``argv``, to be killed by the kernel when the agent dies (see ``_IF_PARENT``)."""
    setpriv = _setpriv()
    if setpriv is None:
        return [sys.executable, "-I", "-c", _GUARD, str(os.getpid()), *argv]
    return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _IF_PARENT, str(os.getpid()), *argv]


class Runner:
    """Runs commands one at a time, streaming their output, killable from another thread."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._cancelled = False
        self.cancelled = threading.Event()  # for waits outside a command (a node slot)
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)

    def run(self, argv: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> str:
        """Run ``argv``; stream (or, when ``quiet``, only remember) its output; return it."""
        with self._lock:
            if self._cancelled:
                raise Cancelled()
            self._process = subprocess.Popen(
                _tied_to_agent(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        process = self._process
        assert process.stdout is not None
        output: list[str] = []
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            output.append(line)
            self.tail.append(line)
            if not quiet:
                self._log(line)
        code = process.wait()
        with self._lock:
            self._process = None
            if self._cancelled:
                raise Cancelled()
        if code != 0:
            raise BuilderFailed(f"{os.path.basename(argv[0])} exited with status {code}", self.tail, code < 0)
        return "\n".join(output)

    def cancel(self) -> None:
        """Kill the running command's whole process group: TERM, then KILL after a grace period."""
        with self._lock:
            self._cancelled = True
            self.cancelled.set()
            process = self._process
        if process is None:
            return
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(_KILL_GRACE)
        _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


class BuildSpec:
    """Everything a backend needs for one build, in the build's own folder."""

    def __init__(
        self,
        builder: str,
        workdir: str,
        build_dir: str,
        platform: str,
        dockerfile: str,
        build_args: dict[str, str],
        target: str,
        insecure_registries: Sequence[str],
        isolation: str = "oci",
        network: str = "default",
    ) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}")
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}")
        self.builder = builder
        self.workdir = workdir
        self.build_dir = build_dir
        self.context_dir = os.path.join(build_dir, "context")
        self.dockerfile_path = os.path.join(build_dir, "Dockerfile")
        self.layout_dir = os.path.join(build_dir, "image")
        self.platform = platform
        self.dockerfile = dockerfile
        self.build_args = build_args
        self.target = target
        self.insecure_registries = [_checked_host(host) for host in insecure_registries]
        self.isolation = isolation
        self.network = network


def export_image(spec: BuildSpec, runner: Runner) -> str:
    """Build ``spec`` and leave its image as an OCI layout in ``spec.layout_dir``; return it."""
    with open(spec.dockerfile_path, "w", encoding="utf-8") as dockerfile:
        dockerfile.write(spec.dockerfile)
    if spec.builder in ("buildah", "podman"):
        _build_with_containers_tools(spec, runner)
    elif spec.builder == "docker":
        _build_with_docker(spec, runner)
    else:
        raise ValueError(f"unknown builder {spec.builder!r}")
    return spec.layout_dir


def _common_build_flags(spec: BuildSpec, iidfile: str) -> list[str]:
    """Flags every builder takes. Build arguments name their keys only: their values reach the
    builder through its environment, never its command line (which every user of the node can
    read in ``ps``)."""
    flags = ["--platform", spec.platform, "-f", spec.dockerfile_path, "--iidfile", iidfile]
    for key in sorted(spec.build_args):
        flags += ["--build-arg", key]
    if spec.target:
        flags += ["--target", spec.target]
    return flags


def _builder_environment(spec: BuildSpec) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in spec.build_args}
    env.update(spec.build_args)
    return env


def _build_with_containers_tools(spec: BuildSpec, runner: Runner) -> None:
    base = storage_command(spec.builder, spec.workdir)
    env = _builder_environment(spec)
    env["CONTAINERS_REGISTRIES_CONF"] = _write_registries_conf(spec)
    iidfile = os.path.join(spec.build_dir, "iid")
    build = [*base, "bud" if spec.builder == "buildah" else "build", "--layers"]
    if spec.isolation == "oci":
        runtime = oci_runtime()
        if runtime is None:
            raise BuilderFailed("this node has no OCI runtime (runc) to isolate RUN steps with", [])
        build += ["--isolation", "oci", "--runtime", runtime]
    else:
        build += ["--isolation", "chroot"]
    # chroot isolation is no sandbox: its RUN steps share the node's network whatever was asked
    # (buildah refuses any other), as they share its processes.
    network = spec.network if spec.isolation == "oci" else "host"
    if network == "default":
        build += ["--network", "ns:" + _NETNS_PLACEHOLDER, "--dns", _SLIRP_DNS]
    else:
        build += ["--network", network]
    cache = _export_blob_cache(spec.builder, spec.workdir)
    cache_flags = ["--blob-cache", cache] if cache is not None else []
    build += [*cache_flags, *_common_build_flags(spec, iidfile), spec.context_dir]
    build = _contained(base, build, private_network=network == "default")
    # Builds share the store; tidying it takes it alone (see tidy_store).
    with _storage_lock(spec.workdir, exclusive=False):
        runner.run(build, env)
        # The image stays in the store: its layers are the cache of the next build of this context.
        push = [*base, "push", "--quiet", *cache_flags, _read(iidfile), "oci:" + spec.layout_dir]
        runner.run(push, env, quiet=True)
    if cache is not None:
        _drop_uncompressed_copies(cache, spec.layout_dir)


# Run as ``sh -c _PRIVATE_NETWORK farm-network SLIRP4NETNS BUILDER-ARGV...``, as the first process
# of the build's PID namespace: a network namespace held open by a child, slirp4netns giving it
# outbound access (and no way to the node's loopback), then the builder with the namespace's path
# in place of the placeholder. Each step waits for the one before to say it is ready: the holder
# prints its process id from inside its new namespace (nothing if ``unshare`` failed), slirp4netns
# writes "1" to its ready descriptor once the namespace has its network and closes it (or exits
# without). When this script ends the namespace's other processes, holder and slirp4netns
# included, end with it. Rootless, this runs inside ``buildah unshare``: the namespace then belongs
# to the user namespace the builder runs in, the only one whose RUN steps may join it.
_NETNS_PLACEHOLDER = "@FARM-NETNS@"
_PRIVATE_NETWORK = """slirp=$1
shift
holder=$(unshare --net -- /bin/sh -c 'echo $$; exec sleep 2147483647 >/dev/null' </dev/null &)
if [ -z "$holder" ]; then
  echo "farm: cannot create the build's network namespace (unshare --net failed)" >&2
  exit 125
fi
ready=$("$slirp" --configure --mtu=65520 --disable-host-loopback --ready-fd=3 "$holder" tap0 \\
  3>&1 >/dev/null </dev/null &)
if [ "$ready" != 1 ]; then
  echo "farm: slirp4netns could not give the build its network" >&2
  exit 125
fi
for part do
  shift
  [ "$part" = ns:@FARM-NETNS@ ] && part=ns:/proc/$holder/ns/net
  set -- "$@" "$part"
done
"$@"
"""


def _contained(store: list[str], build: list[str], private_network: bool) -> list[str]:
    """The build command in a PID namespace of its own, in the private network if asked for, and,
    rootless, in the builder's user namespace.

    The PID namespace is what makes a killed build end whole: runc starts each RUN step in a
    session of its own, out of reach of the command's process group, but when the namespace's
    first process dies (``--kill-child``: when ``unshare`` does) the kernel kills everything in it,
    RUN steps included. Its mounts end with it too. Rootless, ``unshare`` is the child of
    ``buildah unshare``'s process in the user namespace, not of the agent: it gets a parent-death
    signal of its own, so that the agent's death (which ends ``buildah unshare``, which ends that
    process) reaches it."""
    if private_network:
        slirp = shutil.which("slirp4netns")
        if slirp is None:
            raise BuilderFailed("this node lacks slirp4netns, which gives RUN steps a private network", [])
        build = ["/bin/sh", "-c", _PRIVATE_NETWORK, "farm-network", slirp, *build]
    build = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--", *build]
    if os.geteuid() == 0:
        return build
    setpriv = _setpriv()
    # Without setpriv, the Python guard kills the whole process group, this process included.
    tied = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv is not None else []
    return [*store, "unshare", "--", *tied, *build]


def oci_runtime() -> str | None:
    """The OCI runtime RUN steps are sandboxed with: runc (crun fails on hybrid cgroups)."""
    return shutil.which("runc")


def private_network_ready() -> bool:
    """Can builds here get a private network (``unshare`` and ``slirp4netns``)?"""
    return shutil.which("slirp4netns") is not None and shutil.which("unshare") is not None


def storage_command(builder: str, workdir: str) -> list[str]:
    """``buildah``/``podman`` with the agent's own store in its workdir, never the node's."""
    storage, driver = _storage(builder, workdir)
    return [
        builder,
        "--root", os.path.join(storage, "root"),
        "--runroot", os.path.join(storage, "run"),
        "--storage-driver", driver,
    ]  # fmt: skip


def _storage(builder: str, workdir: str) -> tuple[str, str]:
    """The folder of the builder's store in ``workdir``, and its storage driver."""
    driver = storage_driver(workdir)
    return os.path.join(workdir, "storage", f"{builder}-{driver}"), driver


def storage_driver(workdir: str) -> str:
    """overlay where this node can mount it (root, a kernel and file system that allow it), else vfs.

    vfs copies the whole root file system at every step: several times slower, but it works
    everywhere. The answer is probed once per workdir and remembered; concurrent first builds
    (several slots, several agents) wait for one probe rather than race on its probe folder.
    """
    remembered = os.path.join(workdir, "storage", "driver")
    os.makedirs(os.path.dirname(remembered), exist_ok=True)
    with open(remembered + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(remembered) as answer:
                return answer.read().strip()
        except FileNotFoundError:
            pass
        driver = "overlay" if _overlay_mounts(os.path.join(workdir, "storage")) else "vfs"
        with open(remembered + ".partial", "w") as answer:
            answer.write(driver)
        os.replace(remembered + ".partial", remembered)
        return driver


def _overlay_mounts(folder: str) -> bool:
    """Can overlay be mounted here: as root, or rootless in a user namespace (Linux 5.11 and
    newer), as the builder itself will mount it?"""
    if shutil.which("mount") is None:
        return False
    as_user = [] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount", "--"]
    if as_user and shutil.which("unshare") is None:
        return False
    probe = os.path.join(folder, ".overlay-probe")
    parts = {name: os.path.join(probe, name) for name in ("lower", "upper", "work", "merged")}
    try:
        for path in parts.values():
            os.makedirs(path, exist_ok=True)
        options = "lowerdir={lower},upperdir={upper},workdir={work}".format(**parts)
        mounted = subprocess.run(
            [*as_user, "mount", "-t", "overlay", "overlay", "-o", options, parts["merged"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        if mounted.returncode != 0:
            return False
        if not as_user:  # a user namespace's mounts end with it
            subprocess.run(
                ["umount", parts["merged"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30
            )
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def _storage_lock(workdir: str, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Builds share the store; tidying takes it alone. Yields whether the lock was taken."""
    path = os.path.join(workdir, "storage", "lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(lock, flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clear_leftovers(builder: str, workdir: str, log: Callable[[str], None]) -> None:
    """After a killed build: remove the working containers it left in the store, unless another
    build is using the store (they may be its own; the next build alone there clears them). Its
    processes and mounts ended with its PID and mount namespaces."""
    if builder not in ("buildah", "podman"):
        return
    store = storage_command(builder, workdir)
    with _storage_lock(workdir, exclusive=True, wait=False) as alone:
        if alone:
            Runner(log).run([*store, "rm", "--all"], quiet=True)


def tidy_store(builder: str, workdir: str, runner: Runner, min_free: int) -> None:
    """Before a build: clear what killed builds left behind, and the image cache if disk is short.

    Both need the store to themselves. Leftover working containers are only cleared when no other
    build runs (they may be its own); a full disk is worth waiting for.
    """
    if builder not in ("buildah", "podman"):
        return
    store = storage_command(builder, workdir)
    short = shutil.disk_usage(workdir).free < min_free
    with _storage_lock(workdir, exclusive=True, wait=short) as alone:
        if not alone:
            return
        # The store's own list of containers says, without starting the builder, whether there can
        # be any: a builder's containers (buildah's, podman's) are all in it.
        if _store_lists_containers(builder, workdir) and runner.run(
            [*store, "containers", "--quiet"] if builder == "buildah" else [*store, "ps", "-aq"], quiet=True
        ):
            runner.run([*store, "rm", "--all"], quiet=True)
        cache = _blob_cache(builder, workdir)
        if short:
            runner.run([*store, "rmi", "--all", "--force"], quiet=True)
            shutil.rmtree(cache, ignore_errors=True)
        else:
            _prune_blob_cache(cache)


def _store_lists_containers(builder: str, workdir: str) -> bool:
    """Does the builder's store hold a container, or might it (a list it cannot read)?

    containers/storage keeps its containers in ``ROOT/DRIVER-containers/containers.json`` and,
    newer versions, those marked volatile in ``RUNROOT/DRIVER-containers/volatile-containers.json``,
    each a JSON list written whole (a temporary file renamed). Read under the store's exclusive
    lock: no build of this workdir is changing them."""
    storage, driver = _storage(builder, workdir)
    for path in (
        os.path.join(storage, "root", f"{driver}-containers", "containers.json"),
        os.path.join(storage, "run", f"{driver}-containers", "volatile-containers.json"),
    ):
        try:
            with open(path, "rb") as listing:
                if json.load(listing):
                    return True
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return True
    return False


# buildah's blob cache (``--blob-cache``, an option buildah's help does not list): bud keeps there a
# copy of every blob it pulls or commits, a pulled compressed layer with its uncompressed twin and a
# note on each naming the other, and push then exports a layer whose compressed form the cache
# holds as those very bytes. The image exported to the OCI layout thus keeps its base image's own
# layer blobs, instead of compressing them again into new ones (CPU, a new digest, a new upload).
# Only buildah: podman's push has no such option.
_BLOB = re.compile(r"^sha256:[0-9a-f]{64}")
_COMPRESSED_NOTE = ".compressed"  # on an uncompressed blob's name: its compressed twin's digest
_DECOMPRESSED_NOTE = ".decompressed"  # on a compressed blob's name: its uncompressed twin's digest


def _blob_cache(builder: str, workdir: str) -> str:
    return os.path.join(_storage(builder, workdir)[0], "blob-cache")


def _export_blob_cache(builder: str, workdir: str) -> str | None:
    """The blob cache a build and its export go through, made if need be; None: the builder has none."""
    if builder != "buildah":
        return None
    cache = _blob_cache(builder, workdir)
    os.makedirs(cache, exist_ok=True)
    return cache


def _drop_uncompressed_copies(cache: str, layout: str) -> None:
    """Right after an export: remove from the blob cache the copies of the image's layers as the
    store holds them (uncompressed, named by their diff IDs; each layer the build committed, and
    the twins of those it pulled), so that a build's layers are not on disk twice for longer than
    the build. Safe beside other builds: one reading such a copy keeps reading what it opened, one
    about to open it reads the store instead. The notes and the compressed blobs stay."""
    try:
        with open(os.path.join(layout, "index.json"), "rb") as index_file:
            (manifest,) = json.load(index_file)["manifests"]
        with open(_layout_blob(layout, manifest["digest"]), "rb") as manifest_file:
            config_digest = json.load(manifest_file)["config"]["digest"]
        with open(_layout_blob(layout, config_digest), "rb") as config_file:
            diff_ids = json.load(config_file)["rootfs"]["diff_ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the upload reads the layout again, and says what is wrong with it
    for diff_id in diff_ids:
        if isinstance(diff_id, str) and _BLOB.fullmatch(diff_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cache, diff_id))


def _layout_blob(layout: str, digest: str) -> str:
    if not isinstance(digest, str) or not _BLOB.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])


def _prune_blob_cache(cache: str) -> None:
    """Keep of the blob cache what an export uses: the compressed blobs that were pulled and the
    notes that name them. Each build leaves more there (the uncompressed twins of what it pulled,
    every layer and config it committed, the manifests it exported), which the store holds anyway.
    Only with the store to itself: no build is writing into the cache."""
    try:
        names = set(os.listdir(cache))
    except FileNotFoundError:
        return
    for name in names:
        if not _BLOB.match(name) or name.endswith((_COMPRESSED_NOTE, _DECOMPRESSED_NOTE)):
            continue
        if name + _DECOMPRESSED_NOTE in names:
            continue  # a compressed blob that was pulled: what an export reuses
        # An uncompressed blob, a config, a manifest, or a temporary file left by a killed build.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cache, name))


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)(:[0-9]{1,5})?$")


def _checked_host(host: str) -> str:
    """A registry ``host[:port]``: nothing that could add settings to ``registries.conf``."""
    if not isinstance(host, str) or not _HOST.match(host):
        raise ValueError(f"{host!r} is not a registry host[:port]")
    return host


def _write_registries_conf(spec: BuildSpec) -> str:
    """Plain-HTTP registries for this build only, without touching the node's own config."""
    path = os.path.join(spec.build_dir, "registries.conf")
    with open(path, "w") as conf:
        conf.write('short-name-mode = "disabled"\n')
        for host in spec.insecure_registries:
            conf.write(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return path


def _build_with_docker(spec: BuildSpec, runner: Runner) -> None:
    env = _builder_environment(spec)
    # The classic builder honours --platform; BuildKit needs buildx, which nodes may lack.
    env["DOCKER_BUILDKIT"] = "0"
    iidfile = os.path.join(spec.build_dir, "iid")
    # dockerd runs RUN steps in its own containers (runc, its own namespaces): isolation is its.
    runner.run(
        ["docker", "build", "--network", spec.network, *_common_build_flags(spec, iidfile), spec.context_dir],
        env,
    )
    image_id = _read(iidfile)
    archive = os.path.join(spec.build_dir, "image.tar")
    try:
        runner.run(["docker", "save", "-o", archive, image_id], env, quiet=True)
    finally:
        runner.run(["docker", "rmi", "--force", image_id], env, quiet=True)
    _docker_archive_to_layout(archive, spec.layout_dir)
    os.unlink(archive)


def _docker_archive_to_layout(archive: str, layout: str) -> None:
    """Turn ``docker save`` output into a layout holding a Docker v2 manifest, as ``docker push`` would."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    with tarfile.open(archive) as tar:
        saved = json.load(_member(tar, "manifest.json"))[0]
        config = _member(tar, saved["Config"]).read()
        config_digest = _store(blobs, config)
        layers = []
        for name in saved["Layers"]:
            layer_digest, size = _store_gzipped(blobs, _member(tar, name))
            layers.append(
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": size,
                    "digest": layer_digest,
                }
            )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": config_digest,
        },
        "layers": layers,
    }
    raw = json.dumps(manifest, indent=3).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": manifest["mediaType"], "digest": _store(blobs, raw), "size": len(raw)}],
    }
    with open(os.path.join(layout, "index.json"), "w") as index_file:
        json.dump(index, index_file)
    with open(os.path.join(layout, "oci-layout"), "w") as marker:
        json.dump({"imageLayoutVersion": "1.0.0"}, marker)


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    extracted = tar.extractfile(name)
    if extracted is None:
        raise ValueError(f"docker save output lacks {name}")
    return extracted


def _store(blobs: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as blob:
        blob.write(data)
    return "sha256:" + digest


def _store_gzipped(blobs: str, source: IO[bytes]) -> tuple[str, int]:
    partial = os.path.join(blobs, ".partial")
    # mtime=0 and no file name: the same layer always compresses to the same digest.
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as zipped:
        shutil.copyfileobj(source, zipped, 1024 * 1024)
    hasher = hashlib.sha256()
    with open(partial, "rb") as written:
        for chunk in iter(lambda: written.read(1024 * 1024), b""):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    os.replace(partial, os.path.join(blobs, digest))
    return "sha256:" + digest, os.path.getsize(os.path.join(blobs, digest))


def _read(path: str) -> str:
    with open(path) as source:
        return source.read().strip()
