"""The coordination cost over SSH: one multi-platform build on three SSH nodes, farm against the
same builds run by hand on those nodes.

    .venv/bin/python bench/ssh_coordination.py [--rounds 5] [--platforms a,b,c] [--json FILE]

The lab is tests/sshlab.py's: three real OpenSSH nodes (``node0``..``node2``), each in a network
namespace of its own on a bridge of this machine, reached as the unprivileged build user
``farm-build`` with the lab's key and strict host key checking; and a registry on the bridge's
address (``tests.lab.running_registry``, seeded with the lab's busybox), the only other thing
the nodes can reach. All traffic is between this machine's loopback, the bridge and the nodes'
namespaces. The nodes share this machine's CPUs (2 here) and file system.

  farm     ``farm build --no-cache --insecure-registry REG`` with an inventory of the three
           nodes (``SshNode.inventory_entry()``: user farm-build, the lab's key and known_hosts;
           a fresh ``workdir`` per node per round; ``slots`` = platforms / 3, rounded up;
           emulation on). farm picks the nodes, ships the context, runs its agent on each,
           which builds with rootless buildah, exports and uploads; farm verifies every image
           and pushes the index.
  by hand  what a user would run instead, as the same user with the same buildah flags as
           farm's agent (agent/builders.py ``_build_with_containers_tools``): for platform i, on
           node i mod 3, all at once,
           ``tar c CONTEXT | ssh farm-build@NODE 'tar x && contained-bud.sh STORAGE -- --layers
           --platform P --tls-verify=false -t IMAGE CTX && buildah push --digestfile ...'``
           (contained-bud.sh: ``buildah unshare``, a PID namespace, ``--isolation oci --runtime
           runc``, a private network through slirp4netns, as farm's agent), then here, as
           farm-build, ``buildah manifest create``, one ``manifest add`` per image and
           ``buildah manifest push --all``.

Cold on both sides every round: fresh node workdirs and storage (made outside the timing), the
storage driver farm's agent picks (checked), ``--no-cache`` for farm. The order alternates. Wall
time is ``time.perf_counter`` around each side; CPU is this side's local processes (farm, or
tar + ssh + the manifest commands) plus everything the nodes' sshd ran for it (read from the
listening sshd's own and reaped children's times once every session has ended); the registry's
CPU is printed apart. Both pushed indexes are read back and checked (one image per platform,
of that platform).

Target: median wall farm / by hand <= 1.05. Exit 0 whether or not it is met; 1 if something
failed. Needs root and the lab (deploy/lab/setup.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from buildnode import build_user_workdir
from common import (
    BUILD_USER,
    BenchError,
    agent_storage_driver,
    as_build_user,
    at_most,
    build_user_env,
    busy_share,
    check_index,
    figure,
    stamp,
    timed,
    wipe,
    write_json,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests import lab as testlab  # noqa: E402
from tests import sshlab  # noqa: E402

DEFAULT_PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7,linux/s390x,linux/ppc64le,linux/386"
TARGET = 1.05
NODES = 3
TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of every child it has reaped (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / TICK


class CpuGroup:
    """A cgroup (v1 cpuacct) holding the nodes' sshd: whatever they start stays in it, however it
    is reaped, and ``cpuacct.usage`` counts all of its CPU time. (sshd does not hand its sessions'
    times up to the listener: the listener's reaped-children times miss nearly all of it.)"""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, name: str) -> None:
        self.path = self.ROOT / name
        self.path.mkdir()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def usage(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        for _ in range(50):
            pids = (self.path / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    (self.ROOT / "cgroup.procs").write_text(f"{pid}\n")
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def nodes_cpu(nodes: list[sshlab.SshNode], group: CpuGroup) -> float:
    """What the nodes' sshd and all it ran used, once every session has ended."""
    deadline = time.monotonic() + 60
    for node in nodes:
        while len(node.pids()) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    return group.usage()


def ssh_argv(node: sshlab.SshNode, remote: str) -> list[str]:
    """OpenSSH to ``node`` as the build user, strict host key checking, as a user would."""
    return [
        "ssh", "-F", "none", "-T",
        "-i", str(node.lab.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={node.lab.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR",
        f"{BUILD_USER}@{node.address}", "--", remote,
    ]  # fmt: skip


def write_inventory(path: Path, nodes: list[sshlab.SshNode], workdirs: list[Path], slots: int) -> Path:
    lines = ["nodes:"]
    for node, workdir in zip(nodes, workdirs, strict=True):
        entry = {
            **node.inventory_entry(),
            "workdir": str(workdir),
            "slots": slots,
            "builder": "buildah",
            "emulation": True,
        }
        lines.append("  - " + "\n    ".join(f"{key}: {json.dumps(value)}" for key, value in entry.items()))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_farm(
    farm: str,
    root: Path,
    nodes: list[sshlab.SshNode],
    registry: str,
    tag: str,
    platforms: list[str],
    context: Path,
    log: Path,
) -> tuple[float, float, list[Path]]:
    workdirs = [build_user_workdir(root / f"node{i}") for i in range(len(nodes))]
    inventory = write_inventory(root / "inventory.yaml", nodes, workdirs, math.ceil(len(platforms) / NODES))
    command = [
        farm, "build", "-t", f"{registry}/bench/ssh-farm:{tag}", "--platform", ",".join(platforms),
        "--no-cache", "--insecure-registry", registry, "--inventory", str(inventory),
        "--progress", "plain", str(context),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FARM_INVENTORY"}
    seconds, cpu = timed(command, env, log)
    return seconds, cpu, workdirs


def run_by_hand(
    root: Path,
    nodes: list[sshlab.SshNode],
    registry: str,
    tag: str,
    platforms: list[str],
    context: Path,
    driver: str,
    logs: Path,
    label: str,
) -> tuple[float, float]:
    repo = f"{registry}/bench/ssh-hand"
    homes = [build_user_workdir(root / f"node{i}") for i in range(len(nodes))]
    manifest_home = build_user_workdir(root / "manifest")
    contained = BENCH / "contained-bud.sh"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    running = []
    for number, platform in enumerate(platforms):
        node, home = nodes[number % len(nodes)], homes[number % len(nodes)]
        storage = f"--root {home}/root --runroot {home}/run --storage-driver {driver}"
        ctx, image, digest = f"{home}/ctx-{number}", f"{repo}:{tag}-{platform.replace('/', '-')}", ""
        digest = f"{home}/digest-{number}"
        remote = (
            f"mkdir -p {ctx} && tar -C {ctx} -xf - && {{ bash {contained} {storage} -- --layers "
            f"--platform {platform} --tls-verify=false -t {image} {ctx} && buildah {storage} push "
            f"--tls-verify=false --digestfile {digest} {image} docker://{image}; }} >&2 && cat {digest}"
        )
        tar = subprocess.Popen(["tar", "-C", str(context), "-cf", "-", "."], stdout=subprocess.PIPE)
        log = (logs / f"{label}-{number}.log").open("w")
        log.write(f"# {' '.join(ssh_argv(node, remote))}\n")
        ssh = subprocess.Popen(
            ssh_argv(node, remote), stdin=tar.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert tar.stdout is not None
        assert ssh.stderr is not None
        tar.stdout.close()
        copier = threading.Thread(target=stamp, args=(ssh.stderr, log, started))
        copier.start()
        running.append((platform, tar, ssh, log, copier))
    digests = []
    for platform, tar, ssh, log, copier in running:
        assert ssh.stdout is not None
        out = ssh.stdout.read()
        ssh.wait()
        tar.wait()
        copier.join()
        log.close()
        if ssh.returncode != 0 or tar.returncode != 0:
            tail = Path(log.name).read_text()[-2000:]
            raise BenchError(f"by hand, {platform} failed (log {log.name}):\n{tail}")
        digests.append(out.decode().strip())
    store = [
        "--root",
        f"{manifest_home}/root",
        "--runroot",
        f"{manifest_home}/run",
        "--storage-driver",
        "vfs",
    ]
    listing = f"hand-{tag}"
    env = build_user_env()
    commands = [
        ["buildah", *store, "manifest", "create", listing],
        *(["buildah", *store, "manifest", "add", "--tls-verify=false", listing, f"docker://{repo}@{d}"]
          for d in digests),
        ["buildah", *store, "manifest", "push", "--all", "--tls-verify=false", listing, f"docker://{repo}:{tag}"],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(as_build_user(command), capture_output=True, text=True, env=env, cwd="/")
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--platforms", default=DEFAULT_PLATFORMS)
    parser.add_argument("--json", help="write the figures and rounds as JSON here")
    parser.add_argument("--keep-logs", type=Path, help="copy the logs here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("ssh_coordination: needs root (the SSH lab makes network namespaces)")
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    farm = str(Path(sys.executable).parent / "farm")
    rows = []
    with tempfile.TemporaryDirectory(prefix="farm-bench-ssh-") as tmp:
        scratch = Path(tmp)
        logs = scratch / "logs"
        logs.mkdir()
        try:
            with (
                sshlab.ssh_lab(scratch, count=NODES) as the_lab,
                testlab.running_registry(scratch / "registry", the_lab.host_address) as registry,
            ):
                group = CpuGroup(f"farm-bench-ssh-{the_lab.id}")
                try:
                    for node in the_lab.nodes:
                        group.add(node.sshd_pid or 0)
                    rows = _rounds(args, the_lab, registry, group, farm, platforms, scratch, logs)
                finally:
                    for node in the_lab.nodes:
                        node.stop_sshd()
                    group.close()
        except (BenchError, testlab.LabError) as exc:
            print(f"ssh_coordination: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.keep_logs:
                shutil.copytree(logs, args.keep_logs, dirs_exist_ok=True)
    median = statistics.median
    wall = median(r["ratio"] for r in rows)
    cpu = median(r["cpu_ratio"] for r in rows)
    print()
    print(
        f"median wall: farm {median(r['farm_s'] for r in rows):.2f} s, "
        f"by hand {median(r['hand_s'] for r in rows):.2f} s"
    )
    print(
        f"median CPU (local + nodes): farm {median(r['farm_cpu'] for r in rows):.2f} s, "
        f"by hand {median(r['hand_cpu'] for r in rows):.2f} s; registry "
        f"{median(r['farm_registry_cpu'] for r in rows):.2f} s / "
        f"{median(r['hand_registry_cpu'] for r in rows):.2f} s"
    )
    figures = [
        at_most("wall farm/by hand, 3 SSH nodes", wall, TARGET, "x"),
        figure("CPU farm/by hand, 3 SSH nodes", cpu, "x"),
    ]
    print(
        f"median wall farm/by hand: {wall:.3f} (target <= {TARGET}: {'met' if wall <= TARGET else 'MISSED'})"
    )
    print(f"median CPU farm/by hand:  {cpu:.3f} (no target)")
    write_json(args.json, "ssh_coordination", figures, platforms=platforms, rounds=rows)
    return 0


def _rounds(
    args: argparse.Namespace,
    the_lab: sshlab.SshLab,
    registry: testlab.Registry,
    group: CpuGroup,
    farm: str,
    platforms: list[str],
    scratch: Path,
    logs: Path,
) -> list[dict[str, object]]:
    nodes = the_lab.nodes
    context = scratch / "hello"
    shutil.copytree(REPO / "examples" / "hello", context)
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("localhost:5000", registry.host))
    os.chmod(scratch, 0o711)
    driver = agent_storage_driver(REPO, build_user_workdir(scratch / "probe"))
    wipe(scratch / "probe")
    assert registry.process is not None
    run_id = uuid.uuid4().hex[:8]
    print(f"lab       {[f'{n.name} {n.address}' for n in nodes]}, registry {registry.host}")
    print(f"platforms {','.join(platforms)}; slots per node {math.ceil(len(platforms) / NODES)}")
    print(f"storage   {driver}; rounds {args.rounds}; load average {os.getloadavg()[0]:.2f} at start")
    print()
    print(
        f"{'round':>5}  {'first':<8}{'farm s':>8}{'hand s':>8}{'wall':>7}"
        f"{'farm cpu':>9}{'hand cpu':>9}{'cpu':>7}{'busy':>6}"
    )
    rows = []
    for number in range(1, args.rounds + 1):
        order = ("farm", "hand") if number % 2 else ("hand", "farm")
        tag = f"{run_id}-r{number}"
        result: dict[str, object] = {"round": number, "first": order[0]}
        busy = 0.0
        for side in order:
            root = scratch / f"r{number}-{side}"
            root.mkdir()
            busy = max(busy, busy_share())
            node_cpu = nodes_cpu(nodes, group)
            registry_cpu = process_cpu(registry.process.pid)
            if side == "farm":
                seconds, cpu, workdirs = run_farm(
                    farm, root, nodes, registry.host, tag, platforms, context, logs / f"r{number}-farm.log"
                )
                for workdir in workdirs:
                    used = (workdir / "storage" / "driver").read_text().strip()
                    if used != driver:
                        raise BenchError(f"farm's agent used {used}, by hand {driver}: not the same work")
            else:
                seconds, cpu = run_by_hand(
                    root, nodes, registry.host, tag, platforms, context, driver, logs, f"r{number}-hand"
                )
            result[f"{side}_s"] = seconds
            result[f"{side}_local_cpu"] = cpu
            result[f"{side}_cpu"] = cpu + nodes_cpu(nodes, group) - node_cpu
            result[f"{side}_registry_cpu"] = process_cpu(registry.process.pid) - registry_cpu
            wipe(root)
        check_index(f"{registry.host}/bench/ssh-farm:{tag}", platforms)
        check_index(f"{registry.host}/bench/ssh-hand:{tag}", platforms)
        result["ratio"] = float(result["farm_s"]) / float(result["hand_s"])  # type: ignore[arg-type]
        result["cpu_ratio"] = float(result["farm_cpu"]) / float(result["hand_cpu"])  # type: ignore[arg-type]
        result["busy"] = busy
        rows.append(result)
        print(
            f"{number:>5}  {order[0]:<8}{result['farm_s']:>8.2f}{result['hand_s']:>8.2f}"
            f"{result['ratio']:>7.3f}"
            f"{result['farm_cpu']:>9.2f}{result['hand_cpu']:>9.2f}{result['cpu_ratio']:>7.3f}{busy:>6.0%}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
