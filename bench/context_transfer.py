"""Shipping a build context to a node: farm against ``tar c | ssh node tar x`` with OpenSSH.

    .venv/bin/python bench/context_transfer.py [--rounds N] [--tmpdir DIR] [--json PATH]

(a) Full transfer. The same generated context (>= 5,000 files, >= 100 MiB) goes to one node,
    ``root@127.0.0.1`` on a private OpenSSH ``sshd`` this script starts, every round by

      tar      ``tar -C CTX -cf - . | ssh ... root@127.0.0.1 'mkdir -p DEST && tar -C DEST -xf -'``
               with OpenSSH's default cipher (the one it negotiates is printed), into a fresh DEST;
      tar-gcm  the same, with ``-c aes128-gcm@openssh.com``, the cipher farm negotiates
               (supplementary: shows how much of the gap is the cipher; skip with --no-gcm);
      farm     ``AgentSession.sync(context)`` over farm's own SSH transport (``SshConnections``,
               ``SshTransport``, ``open_session``) into an agent whose workdir, hence content
               store, is brand new and empty.

    Timing. farm's context scan (walk + sha256 of every file) runs once, before the rounds and
    outside every timed section: it is done once per build whatever the number of nodes, and its
    cost is printed on its own. What is timed for farm is ``sync()``: the manifest going out, the
    agent's answer, every blob read (and re-hashed) on this side, sent, hashed and stored on the
    node, and the node's ``synced``. Each round's ``Context`` has an empty read cache, as the
    first node of a build sees it (``Context.read_blob`` keeps checked blobs for the next nodes).
    Connecting and starting the agent (stage one; the zipapp is sent too, since each round's
    workdir is new) happen before, timed separately.
    tar's wall time is the whole pipeline, so it includes ssh connecting, authenticating and
    starting the remote shell. The ratios printed:

      transfer    farm sync  vs  tar wall - ssh overhead (median ``ssh ... true`` this round):
                  transfer against transfer. This is the one judged against the target.
      as timed    farm sync  vs  tar wall (flatters farm by the ssh start-up)
      end to end  farm connect + agent start + sync  vs  tar wall (flatters tar: farm's side
                  includes sending the agent zipapp, a one-time cost per node)

    Throughput is the context's file bytes (MB = 10^6 bytes) over the time; the ratio is
    farm MB/s / tar MB/s in the same round, and the median over rounds is the result.

    Both sides write to the same file system: ``--tmpdir``, by default /dev/shm (tmpfs), so the
    disk is not what is measured. Order alternates (farm first in odd rounds, tar first in even
    rounds). The share of CPU in use just before each side is printed. Before each timed run
    ``os.sync()`` flushes the previous run's dirty pages so their writeback does not land inside
    it. After each run, untimed, the result is checked: tar's tree must hold every file, link and
    folder of the context with the same bytes (sha256 of each file); farm's content store must
    hold exactly the context's distinct blobs, each of the right size and hash, and its manifest.

(b) Incremental resend. A cold scan with a ``StatCache`` (in a temp cache folder) and a full sync
    to a fresh node; then, ``--incremental N`` times: rewrite one small source file, re-scan with
    the warm stat cache (only that file is re-hashed), open a session and sync again. Reported:
    bytes sent as a fraction of the full sync's bytes (target <= 1 %), and the time of
    warm re-scan + sync as a fraction of the full sync's time (target <= 10 %). The full time is
    the median of every full farm sync of this run ((a)'s rounds and (b)'s own). The time of
    opening a session (connection + cached agent) is printed separately, and a fraction with it
    included too. Scan times with and without the warm cache are printed.

Content: deterministic (``--seed``), from a seeded RNG. About 5,600 source-like files
(200 B - 24 KiB, log-uniform, base64 text lines: 6 bits per byte, so compression could save at
most 25 %), 40 empty ``__init__.py``, 320 assets of 16 - 256 KiB and 16 binaries of 1 - 8 MiB of
random bytes, a few relative symlinks, in nested folders. Neither side compresses (OpenSSH's
default is ``Compression no``; farm passes ``compression_algs=None``).

The script exits 0 whether or not the targets are met; non-zero only if something fails. Its sshd
is stopped on the way out, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from common import at_least, at_most, write_json  # noqa: E402

from agent import protocol  # noqa: E402
from farm.context import Context, StatCache, scan_context  # noqa: E402
from farm.inventory import NodeSpec  # noqa: E402
from farm.session import open_session  # noqa: E402
from farm.transport.ssh import SshConnections, SshTransport  # noqa: E402

SSHD = "/usr/sbin/sshd"
GCM = "aes128-gcm@openssh.com"
TARGET_RATIO = 0.9
TARGET_BYTES = 0.01
TARGET_TIME = 0.10
MIN_FILES = 5000
MIN_BYTES = 100 * 1024 * 1024


class BenchError(Exception):
    pass


def log(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# The context


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def _text(rng: random.Random, size: int) -> bytes:
    raw = rng.randbytes(size * 3 // 4 + 3)
    return base64.encodebytes(raw)[:size]


def generate_context(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx\n")
    extensions = ["py", "c", "h", "go", "rs", "js", "ts", "json", "md", "txt", "yaml", "sh"]
    packages = 40
    for package in range(packages):
        folder = root / "src" / f"pkg{package:02d}"
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_bytes(b"")
    for index in range(5600):
        package = index % packages
        module = rng.randrange(8)
        parts = [f"pkg{package:02d}", f"mod{module}"]
        if rng.random() < 0.5:
            parts.append(f"sub{rng.randrange(4)}")
            if rng.random() < 0.3:
                parts.append(f"deep{rng.randrange(3)}")
        folder = root.joinpath("src", *parts)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"file{index:05d}.{rng.choice(extensions)}"
        (folder / name).write_bytes(_text(rng, _log_uniform(rng, 200, 24 * 1024)))
    for index in range(320):
        folder = root / "assets" / rng.choice(["img", "fonts", "media", "icons"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"asset{index:03d}.bin").write_bytes(
            rng.randbytes(_log_uniform(rng, 16 * 1024, 256 * 1024))
        )
    lib = root / "vendor" / "lib"
    lib.mkdir(parents=True)
    for index in range(16):
        size = rng.randint(1024 * 1024, 8 * 1024 * 1024)
        (lib / f"libv{index:02d}.so.1").write_bytes(rng.randbytes(size))
        if index < 6:
            os.symlink(f"libv{index:02d}.so.1", lib / f"libv{index:02d}.so")
    os.symlink("../vendor/lib", root / "src" / "lib")
    for path in [root / "vendor" / "bin" / "tool", root / "scripts" / "build.sh"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"#!/bin/sh\n" + _text(rng, 2000))
        path.chmod(0o755)


def rewrite_one_file(context: Context, round_: int, seed: int) -> tuple[str, int]:
    """Rewrite a small source file with new content; return its path and new size."""
    small = sorted(e[0] for e in context.entries if e[3] and e[0].startswith("src/") and 1000 < e[2] < 8000)
    path = small[(round_ * 997) % len(small)]
    rng = random.Random(f"{seed}-change-{round_}")
    data = _text(rng, rng.randint(1000, 8000))
    (context.root / path).write_bytes(data)
    return path, len(data)


def _hash(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1024 * 1024):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def verify_tree(context: Context, dest: Path) -> None:
    """tar's result: every entry of the context, with the same bytes, and nothing else."""
    wanted = {e[0]: e for e in context.entries}
    found: set[str] = set()
    for folder, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            full = os.path.join(folder, name)
            relative = os.path.relpath(full, dest)
            found.add(relative)
            entry = wanted.get(relative)
            if entry is None:
                raise BenchError(f"tar: {relative} is not in the context")
            info = os.lstat(full)
            if stat.S_IFMT(info.st_mode) != stat.S_IFMT(entry[1]):
                raise BenchError(f"tar: {relative} has the wrong kind")
            if stat.S_ISLNK(info.st_mode):
                if os.readlink(full) != entry[4]:
                    raise BenchError(f"tar: link {relative} points elsewhere")
            elif stat.S_ISREG(info.st_mode) and (info.st_size != entry[2] or _hash(full) != entry[3]):
                raise BenchError(f"tar: {relative} differs from the context")
    missing = set(wanted) - found
    if missing:
        raise BenchError(f"tar: {len(missing)} entries missing, e.g. {sorted(missing)[:3]}")


def verify_store(context: Context, workdir: Path) -> tuple[int, int]:
    """farm's result: the store holds exactly the context's blobs, intact, and its manifest."""
    blobs = workdir / "cas" / "sha256"
    sizes = {e[3]: e[2] for e in context.entries if e[3]}
    names = {name for name in os.listdir(blobs) if not name.startswith(".")}
    expected = {digest.removeprefix("sha256:") for digest in sizes}
    if names != expected:
        raise BenchError(
            f"farm: the store holds {len(names)} blobs, the context has {len(expected)} "
            f"({len(expected - names)} missing, {len(names - expected)} extra)"
        )
    total = 0
    for digest, size in sizes.items():
        path = blobs / digest.removeprefix("sha256:")
        if path.stat().st_size != size or _hash(str(path)) != digest:
            raise BenchError(f"farm: blob {digest} is damaged")
        total += size
    if not (workdir / "contexts" / (context.digest.replace(":", "-") + ".json")).exists():
        raise BenchError("farm: the node has no manifest of the context")
    return len(names), total


def store_has(workdir: Path, digests: set[str]) -> None:
    blobs = workdir / "cas" / "sha256"
    for digest in digests:
        path = blobs / digest.removeprefix("sha256:")
        if not path.exists() or _hash(str(path)) != digest:
            raise BenchError(f"farm: blob {digest} did not arrive intact")


# --------------------------------------------------------------------------------------------
# The node: a private sshd on 127.0.0.1


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "farm-bench", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            probe.settimeout(1)
            return probe.recv(4).startswith(b"SSH-")
    except OSError:
        return False


class Sshd:
    """OpenSSH's sshd on a free port of 127.0.0.1, root login by a temp key, pinned host key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.client_key = folder / "client_ed25519"
        self.known_hosts = folder / "known_hosts"
        self.log_path = folder / "sshd.log"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        host_key = self.folder / "host_ed25519"
        host_public = _keygen(host_key)
        (self.folder / "authorized_keys").write_text(_keygen(self.client_key) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        for _attempt in range(5):
            self.port = _free_port()
            config = self.folder / "sshd_config"
            config.write_text(
                f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {host_key}\n"
                f"PidFile {self.folder / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nUsePAM no\n"
                "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UseDNS no\nMaxStartups 64:30:256\nSubsystem sftp internal-sftp\nLogLevel INFO\n"
            )
            subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
            with self.log_path.open("ab") as log_file:
                self.process = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,  # a Ctrl-C reaches us, and we stop it
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                if _banner(self.port):
                    self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_public}\n")
                    return
                time.sleep(0.05)
            self.stop()  # lost the port to someone else, or it never answered: try another
        raise BenchError(f"sshd did not start; its log:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def ssh_args(self, *options: str) -> list[str]:
        return [
            "ssh",
            "-F", "/dev/null",  # OpenSSH defaults, whatever a ~/.ssh/config says
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-i", str(self.client_key),
            "-p", str(self.port),
            *options,
            "root@127.0.0.1",
        ]  # fmt: skip

    def spec(self, workdir: Path) -> NodeSpec:
        return NodeSpec(
            name="bench",
            host="127.0.0.1",
            port=self.port,
            user="root",
            identity_file=self.client_key,
            known_hosts=self.known_hosts,
            workdir=str(workdir),
        )


def negotiated(sshd: Sshd, *options: str) -> str:
    done = subprocess.run(
        [*sshd.ssh_args("-v", *options), "true"], capture_output=True, text=True, check=True
    )
    match = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+) compression: (\S+)", done.stderr)
    if not match:
        raise BenchError("cannot tell which cipher ssh negotiated")
    return f"{match.group(1)} (MAC {match.group(2)}, compression {match.group(3)})"


def ssh_overhead(sshd: Sshd) -> float:
    start = time.perf_counter()
    subprocess.run([*sshd.ssh_args(), "true"], check=True, capture_output=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# The two sides


def unread(context: Context) -> Context:
    """The same context with nothing read yet, as the first node of a build gets it.

    ``Context.read_blob`` keeps what it read (and checked) for the next nodes of the same build,
    up to a budget larger than this context; reusing one ``Context`` across rounds would let every
    round after the first skip reading and re-hashing the files.
    """
    return Context(root=context.root, entries=context.entries, blobs=context.blobs, manifest=context.manifest)


def busy_share(seconds: float = 0.5) -> float:
    """The share of all CPUs in use over ``seconds`` while nothing of the benchmark runs."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as source:
            values = [int(v) for v in source.readline().split()[1:]]
        return sum(values), values[3] + values[4]

    total1, idle1 = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle1) / max(1, total2 - total1)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def agent_processes(workdir: Path, listener: int) -> tuple[int | None, list[int]]:
    """The agent serving ``workdir`` and the sshd processes between it and our sshd's listener."""
    wanted = str(workdir).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The agent runs from a memfd since stage one checks it (``python3 -I /proc/self/fd/N``).
        if wanted in argv and any(b"farm-agent-" in arg or arg.startswith(b"/proc/self/fd/") for arg in argv):
            pid = int(name)
            chain = []
            parent = _parent(pid)
            while parent not in (listener, 0, 1):
                chain.append(parent)
                parent = _parent(parent)
            return pid, chain
    return None, []


def run_tar(sshd: Sshd, source: Path, dest: Path, options: tuple[str, ...] = ()) -> tuple[float, float]:
    remote = f"mkdir -p {shlex.quote(str(dest))} && tar -C {shlex.quote(str(dest))} -xf -"
    ssh = " ".join(shlex.quote(part) for part in [*sshd.ssh_args(*options), remote])
    pipeline = f"set -o pipefail; tar -C {shlex.quote(str(source))} -cf - . | {ssh}"
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", pipeline], capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise BenchError(
            f"tar | ssh exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}"
        )
    local_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, local_cpu


@dataclass
class FarmRun:
    connect: float
    agent_start: float
    sync: float
    blobs: int
    bytes: int
    cipher: str
    coordinator_cpu: float = 0.0  # during sync only
    agent_cpu: float = 0.0
    sshd_cpu: float = 0.0  # the connection's sshd processes on the node side


async def run_farm(sshd: Sshd, workdir: Path, context: Context) -> FarmRun:
    spec = sshd.spec(workdir)
    connections = SshConnections()
    try:
        os.sync()
        start = time.perf_counter()
        connection, _ = await connections.connection(spec)
        connected = time.perf_counter()
        async with open_session(spec.name, SshTransport(spec, connections), str(workdir)) as session:
            opened = time.perf_counter()
            agent, chain = agent_processes(workdir, sshd.pid)
            cpu = [time.process_time(), _cpu_seconds(agent) if agent else 0.0, sum(map(_cpu_seconds, chain))]
            synced_at = time.perf_counter()
            blobs, sent = await session.sync(context)
            synced = time.perf_counter()
            cpu = [
                time.process_time() - cpu[0],
                (_cpu_seconds(agent) if agent else 0.0) - cpu[1],
                sum(map(_cpu_seconds, chain)) - cpu[2],
            ]
        cipher = str(connection.get_extra_info("send_cipher"))
    finally:
        await connections.close()
    return FarmRun(connected - start, opened - connected, synced - synced_at, blobs, sent, cipher, *cpu)


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Round:
    number: int
    order: list[str]
    ssh_overhead: float
    tar: float
    tar_local_cpu: float  # tar c + ssh on this side; the node's sshd and tar x are not counted
    tar_gcm: float | None
    farm: FarmRun
    busy: dict[str, float] = field(default_factory=dict)  # CPU in use just before each side
    ratios: dict[str, float] = field(default_factory=dict)


def mbps(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


async def full_rounds(args: argparse.Namespace, sshd: Sshd, work: Path, context: Context) -> list[Round]:
    size = context.size
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        sides = ["tar"] + ([] if args.no_gcm else ["tar-gcm"])
        order = ["farm", *sides] if number % 2 else [*sides, "farm"]
        times: dict[str, tuple[float, float]] = {}
        busy: dict[str, float] = {}
        farm: FarmRun | None = None
        for side in order:
            busy[side] = await asyncio.to_thread(busy_share)
            if side == "farm":
                workdir = fresh(work / "farm-node")
                farm = await run_farm(sshd, workdir, unread(context))
                blobs, stored = await asyncio.to_thread(verify_store, context, workdir)
                if (blobs, stored) != (farm.blobs, farm.bytes):
                    raise BenchError(
                        f"farm reported {farm.blobs} blobs/{farm.bytes} B, the store has {blobs}/{stored}"
                    )
                shutil.rmtree(workdir)
            else:
                dest = fresh(work / "tar-node")
                options = ("-c", GCM) if side == "tar-gcm" else ()
                times[side] = await asyncio.to_thread(run_tar, sshd, context.root, dest, options)
                await asyncio.to_thread(verify_tree, context, dest)
                shutil.rmtree(dest)
        assert farm is not None
        overhead = statistics.median([await asyncio.to_thread(ssh_overhead, sshd) for _ in range(3)])
        tar, tar_cpu = times["tar"]
        gcm = times["tar-gcm"][0] if "tar-gcm" in times else None
        entry = Round(number, order, overhead, tar, tar_cpu, gcm, farm, busy)
        entry.ratios = {
            "transfer": max(tar - overhead, 1e-6) / farm.sync,
            "as timed": tar / farm.sync,
            "end to end": tar / (farm.connect + farm.agent_start + farm.sync),
        }
        if gcm is not None:
            entry.ratios["transfer vs tar-gcm"] = max(gcm - overhead, 1e-6) / farm.sync
        rounds.append(entry)
        gcm_text = f"; tar-gcm {gcm:.3f} s {mbps(size, gcm):.0f} MB/s" if gcm is not None else ""
        log(
            f"round {number} ({' -> '.join(order)}; CPU busy before: "
            + ", ".join(f"{side} {share:.0%}" for side, share in busy.items())
            + ")\n"
            f"  tar  {tar:.3f} s {mbps(size, tar):.0f} MB/s (ssh start-up {overhead:.3f} s; "
            f"CPU of tar c + ssh {tar_cpu:.2f} s){gcm_text}\n"
            f"  farm sync {farm.sync:.3f} s {mbps(size, farm.sync):.0f} MB/s "
            f"(untimed before it: connect {farm.connect:.3f} s, agent start {farm.agent_start:.3f} s; "
            f"{farm.blobs} blobs, {farm.bytes / 1e6:.1f} MB; CPU coordinator {farm.coordinator_cpu:.2f} s, "
            f"agent {farm.agent_cpu:.2f} s, node sshd {farm.sshd_cpu:.2f} s)\n"
            "  ratio farm/tar: " + ", ".join(f"{key} {value:.2f}" for key, value in entry.ratios.items())
        )
    return rounds


@dataclass
class Change:
    changed: str
    size: int
    warm_scan: float
    session_open: float  # connection + agent start (cached), untimed like in (a)
    sync: float
    blobs: int
    bytes: int


@dataclass
class IncrementalResult:
    cold_scan_writing_cache: float
    warm_scan_unchanged: float
    cold_scan_after_changes: float
    full: FarmRun
    full_median: float  # the median of every full sync of this run
    changes: list[Change]

    @property
    def bytes_fraction(self) -> float:
        return max(change.bytes for change in self.changes) / self.full.bytes

    @property
    def time_fraction(self) -> float:
        return statistics.median(c.warm_scan + c.sync for c in self.changes) / self.full_median

    @property
    def time_fraction_with_session_open(self) -> float:
        # The full sync started its agent from nothing (zipapp sent); the changes find it cached.
        full = self.full_median + self.full.connect + self.full.agent_start
        return statistics.median(c.warm_scan + c.session_open + c.sync for c in self.changes) / full


async def incremental(
    args: argparse.Namespace, sshd: Sshd, work: Path, root: Path, full_syncs: list[float]
) -> IncrementalResult:
    cache_dir = work / "stat-cache"
    start = time.perf_counter()
    context = scan_context(root, StatCache.for_context(root, cache_dir))
    cold_with_cache = time.perf_counter() - start
    start = time.perf_counter()
    scan_context(root, StatCache.for_context(root, cache_dir))
    warm_unchanged = time.perf_counter() - start
    workdir = fresh(work / "farm-incremental")
    full = await run_farm(sshd, workdir, context)
    await asyncio.to_thread(verify_store, context, workdir)
    full_median = statistics.median([*full_syncs, full.sync])
    log(
        f"full sync to a fresh node: {full.sync:.3f} s, {full.blobs} blobs, {full.bytes / 1e6:.1f} MB; "
        f"median of all {len(full_syncs) + 1} full syncs {full_median:.3f} s"
    )
    changes: list[Change] = []
    for number in range(1, args.incremental + 1):
        changed, size = rewrite_one_file(context, number, args.seed)
        await asyncio.to_thread(os.sync)
        start = time.perf_counter()
        context = scan_context(root, StatCache.for_context(root, cache_dir))
        scanned = time.perf_counter() - start
        spec = sshd.spec(workdir)
        connections = SshConnections()
        try:
            start = time.perf_counter()
            await connections.connection(spec)
            async with open_session(spec.name, SshTransport(spec, connections), str(workdir)) as session:
                opened = time.perf_counter()
                blobs, sent = await session.sync(context)
                synced = time.perf_counter()
        finally:
            await connections.close()
        digest = next(e[3] for e in context.entries if e[0] == changed)
        await asyncio.to_thread(store_has, workdir, {digest})
        change = Change(changed, size, scanned, opened - start, synced - opened, blobs, sent)
        changes.append(change)
        log(
            f"change {number}: rewrote {changed} ({size} B); warm re-scan {scanned:.3f} s + "
            f"sync {change.sync:.3f} s ({blobs} blob, {sent} B; session opened before it in "
            f"{change.session_open:.3f} s): bytes {sent / full.bytes:.4%}, "
            f"time {(scanned + change.sync) / full_median:.1%} of the full sync"
        )
    start = time.perf_counter()
    scan_context(root)
    cold_after = time.perf_counter() - start
    return IncrementalResult(cold_with_cache, warm_unchanged, cold_after, full, full_median, changes)


@dataclass
class Prepared:
    root: Path
    context: Context
    scan: float
    summary: dict[str, object]


def prepare(args: argparse.Namespace, sshd: Sshd, work: Path) -> Prepared:
    root = work / "context"
    start = time.perf_counter()
    generate_context(root, args.seed)
    log(f"generated the context in {time.perf_counter() - start:.1f} s: {root}")
    start = time.perf_counter()
    context = scan_context(root)
    scan = time.perf_counter() - start
    files = sum(1 for e in context.entries if e[3])
    links = sum(1 for e in context.entries if e[4])
    folders = len(context.entries) - files - links
    size = context.size
    if files < MIN_FILES or size < MIN_BYTES:
        raise BenchError(f"the context is too small: {files} files, {size} bytes")
    stream = subprocess.run(
        f"tar -C {shlex.quote(str(root))} -cf - . | wc -c",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    header = protocol.encode("sync", context=context.digest, size=len(context.manifest))
    manifest = len(header) + len(context.manifest)  # the sync message: a header line, then the manifest
    log(
        f"context: {files} files ({len(context.blobs)} distinct: the {files - len(context.blobs) + 1} "
        f"empty ones are one blob), {links} links, {folders} folders, {size / 1e6:.1f} MB "
        f"({size / 2**20:.1f} MiB); tar stream {int(stream.stdout) / 1e6:.1f} MB, farm's sync message "
        f"{manifest / 1e6:.2f} MB"
    )
    log(
        f"farm's scan (walk + sha256 of every file, no stat cache), outside every timed transfer: "
        f"{scan:.3f} s"
    )
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    tar_cipher = negotiated(sshd)
    log(f"{version}; tar negotiates {tar_cipher}; tar-gcm {negotiated(sshd, '-c', GCM)}")
    log(f"work folder: {work} ({'tmpfs' if _is_tmpfs(work) else 'disk'}); {os.cpu_count()} CPUs")
    summary: dict[str, object] = {
        "context": {
            "files": files,
            "distinct_blobs": len(context.blobs),
            "links": links,
            "folders": folders,
            "bytes": size,
            "tar_stream_bytes": int(stream.stdout),
            "sync_message_bytes": manifest,
        },
        "scan_s": scan,
        "openssh": version,
        "tar_cipher": tar_cipher,
        "tmpfs": _is_tmpfs(work),
    }
    return Prepared(root, context, scan, summary)


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


async def main_async(
    args: argparse.Namespace, sshd: Sshd, work: Path, prepared: Prepared
) -> dict[str, object]:
    context, summary, size = prepared.context, prepared.summary, prepared.context.size
    median = statistics.median
    log("")
    log(f"(a) full transfer, {args.rounds} rounds")
    rounds = await full_rounds(args, sshd, work, context)
    summary["farm_cipher"] = rounds[0].farm.cipher
    summary["rounds"] = [asdict(r) for r in rounds]
    tar_t = median(r.tar for r in rounds)
    sync_t = median(r.farm.sync for r in rounds)
    log("")
    log(
        f"medians over {len(rounds)} rounds ({size / 1e6:.1f} MB each); "
        f"farm negotiates {rounds[0].farm.cipher}"
    )
    log(
        f"  tar        {tar_t:.3f} s {mbps(size, tar_t):6.1f} MB/s, of which ssh start-up "
        f"{median(r.ssh_overhead for r in rounds):.3f} s"
    )
    if not args.no_gcm:
        gcm_t = median(r.tar_gcm or 0.0 for r in rounds)
        log(f"  tar-gcm    {gcm_t:.3f} s {mbps(size, gcm_t):6.1f} MB/s")
    log(
        f"  farm sync  {sync_t:.3f} s {mbps(size, sync_t):6.1f} MB/s; untimed before it: connect "
        f"{median(r.farm.connect for r in rounds):.3f} s, "
        f"agent start {median(r.farm.agent_start for r in rounds):.3f} s"
    )
    log(
        f"  CPU during farm's sync: coordinator {median(r.farm.coordinator_cpu for r in rounds):.2f} s, "
        f"agent {median(r.farm.agent_cpu for r in rounds):.2f} s, "
        f"node sshd {median(r.farm.sshd_cpu for r in rounds):.2f} s; "
        f"during tar: tar c + ssh {median(r.tar_local_cpu for r in rounds):.2f} s"
    )
    ratios = {key: median(r.ratios[key] for r in rounds) for key in rounds[0].ratios}
    summary["median_ratios"] = ratios
    for key, value in ratios.items():
        judged = " (judged)" if key == "transfer" else ""
        log(
            f"  median throughput ratio farm/tar, {key + judged:<21} {value:.2f}  "
            f"({verdict(value >= TARGET_RATIO)} >= {TARGET_RATIO})"
        )
    log("")
    log(f"(b) incremental resend, {args.incremental} one-file changes")
    inc = await incremental(args, sshd, work, prepared.root, [r.farm.sync for r in rounds])
    summary["incremental"] = {
        **asdict(inc),
        "bytes_fraction": inc.bytes_fraction,
        "time_fraction": inc.time_fraction,
        "time_fraction_with_session_open": inc.time_fraction_with_session_open,
    }
    log(
        f"scans: no stat cache {inc.cold_scan_after_changes:.3f} s; cold, writing the cache "
        f"{inc.cold_scan_writing_cache:.3f} s; warm, nothing changed {inc.warm_scan_unchanged:.3f} s; "
        f"warm, one file changed {median(c.warm_scan for c in inc.changes):.3f} s (median)"
    )
    log(
        f"  bytes sent / full sync (worst)         {inc.bytes_fraction:.4%}  "
        f"({verdict(inc.bytes_fraction <= TARGET_BYTES)} <= {TARGET_BYTES:.0%})"
    )
    log(
        f"  (warm re-scan + sync) / full sync      {inc.time_fraction:.1%}  "
        f"({verdict(inc.time_fraction <= TARGET_TIME)} <= {TARGET_TIME:.0%})"
    )
    log(f"  the same, counting session opening     {inc.time_fraction_with_session_open:.1%}")
    summary["figures"] = [
        at_least("full transfer, farm/tar throughput", ratios["transfer"], TARGET_RATIO, "x"),
        at_most("one changed file: bytes / full sync", inc.bytes_fraction * 100, TARGET_BYTES * 100, "%"),
        at_most("one changed file: time / full sync", inc.time_fraction * 100, TARGET_TIME * 100, "%"),
    ]
    return summary


def _is_tmpfs(path: Path) -> bool:
    best = ("", "")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best[0]):
                best = (point, kind)
    return best[1] == "tmpfs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="full-transfer rounds (default 7)")
    parser.add_argument("--incremental", type=int, default=5, help="one-file changes in (b) (default 5)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the context and both nodes' folders go (default /dev/shm: tmpfs, not the disk)",
    )
    parser.add_argument("--no-gcm", action="store_true", help="skip the tar run with farm's cipher")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.rounds < 1 or args.incremental < 1:
        parser.error("--rounds and --incremental must be at least 1")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    work = Path(tempfile.mkdtemp(prefix="farm-bench-transfer-", dir=args.tmpdir)).resolve()
    sshd = Sshd(work / "sshd")
    try:
        sshd.start()
        prepared = prepare(args, sshd, work)
        summary = asyncio.run(main_async(args, sshd, work, prepared))
        figures = summary.pop("figures")
        write_json(args.json, "context_transfer", figures, **summary)
        return 0
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        sshd.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
