"""Where the CPU of a cold build goes, farm's local node against the baseline script, by role.

    .venv/bin/python bench/cpu_profile.py [--rounds 3] [--platforms a,b,c] [--pyspy DIR] [--json FILE]

Each round runs the two sides of ``bench/local_build.py`` once each (the same commands, cold, the
order alternating) under ``perf record -e cpu-clock -F 999 -a``: every CPU is sampled about once a
millisecond, whatever runs, with the fork and exec events that give the process tree. A thread
reads the command line of every new process (every 10 ms), which tells a ``buildah bud`` from a
``buildah push``. Each sample of a process descending from the side's command is then put in a
role: the coordinator (farm's own process), the agent (one process per platform: stage one, the
agent, its upload), the agent's guard processes, containment (``buildah unshare``, ``unshare``,
the private network: the Python helper or the shell, slirp4netns), ``buildah bud`` with its RUN
steps, exporting (``buildah push oci:``), the baseline's ``buildah push``, the manifest commands,
tidying the store. The registry's samples are counted apart (it serves both sides; farm's
verification reads every image back), and so is everything else that ran meanwhile (other
people's work on the machine).

``--pyspy DIR`` adds one more cold farm build under ``py-spy record --subprocesses`` (100 Hz) and
splits the coordinator's and the agents' Python samples by what they were doing (imports,
context scan, verification, index, upload, ...). py-spy counts a thread that is runnable but
waiting for a CPU as busy, so on a saturated machine read its shares, not its seconds.

Not a benchmark (no target): a profile, recorded in bench/README. Needs root (perf -a), perf,
and what ``local_build.py`` needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import local_build
from buildnode import build_user_workdir
from common import BenchError, agent_storage_driver, busy_share, timed, wipe, write_json

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

_FORK = re.compile(r"PERF_RECORD_FORK\((\d+):(\d+)\):\((\d+):(\d+)\)")
_SAMPLE = re.compile(r"^\s*(.*?)\s+(\d+)/(\d+)\s+[\d.]+:\s+(\d+)\s+cpu-clock")
_GLOBAL_FLAGS = {"--root", "--runroot", "--storage-driver"}


class CommandLines:
    """pid -> command line of every process seen while running (polled from /proc).

    A new process is read again on every poll of its first 0.5 s: a fork is often seen before its
    exec (and setpriv, env, stage one exec again), and the last command line is the one that
    says what the process is."""

    def __init__(self, interval: float = 0.01, settle: float = 0.5) -> None:
        self.seen: dict[int, str] = {}
        self._first: dict[int, float] = {}
        self._interval = interval
        self._settle = settle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                pid = int(name)
                if now - self._first.setdefault(pid, now) > self._settle:
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as source:
                        raw = source.read()
                except OSError:
                    continue
                if raw:
                    self.seen[pid] = raw.replace(b"\0", b" ").decode("utf-8", "replace")
            self._stop.wait(self._interval)


class Perf:
    """``perf record`` of every CPU while the block runs."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Perf:
        self._process = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-a", "-o", str(self.output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # perf has its buffers mapped and its task events flowing
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        time.sleep(0.2)
        self._process.send_signal(signal.SIGINT)
        self._process.wait(60)


def parse_perf(path: Path) -> tuple[dict[int, int], dict[int, Counter[str]], dict[int, str]]:
    """(parent of each process, CPU ns per process by comm, last comm of each process)."""
    script = subprocess.run(
        ["perf", "script", "-i", str(path), "--show-task-events", "-F", "comm,pid,tid,time,period,event"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    parent: dict[int, int] = {}
    cpu: dict[int, Counter[str]] = defaultdict(Counter)
    comm: dict[int, str] = {}
    for line in script.splitlines():
        if "PERF_RECORD_FORK" in line:
            match = _FORK.search(line)
            if match and match.group(1) != match.group(3):  # a process, not a thread
                parent[int(match.group(1))] = int(match.group(3))
            continue
        if "PERF_RECORD_COMM exec:" in line:
            name, _, ids = line.split("PERF_RECORD_COMM exec:", 1)[1].strip().rpartition(":")
            comm[int(ids.split("/")[0])] = name
            continue
        match = _SAMPLE.match(line)
        if match:
            pid = int(match.group(2))
            if pid:
                cpu[pid][match.group(1)] += int(match.group(4))
    return parent, cpu, comm


def _subcommand(argv: list[str]) -> str:
    """``buildah [--root R --runroot R --storage-driver D] SUBCOMMAND ...`` -> SUBCOMMAND."""
    words = iter(argv[1:])
    for word in words:
        if word in _GLOBAL_FLAGS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def _is_agent(line: str) -> bool:
    return ("/proc/self/fd/" in line and "--workdir" in line) or "FARM-NEED-AGENT" in line


def classify(pid: int, root: int, parent: dict[int, int], lines: dict[int, str], comm: dict[int, str]) -> str:
    """The role of process ``pid`` in the tree under ``root`` (farm's or the baseline's command)."""
    if pid == root:
        return "coordinator (farm process)" if "farm" in lines.get(root, "") else "shell (baseline.sh)"
    line = lines.get(pid, "")
    argv = line.split()
    if _is_agent(line):
        return "agent (stage one, agent, upload)"
    if "import ctypes, os, signal" in line or "PR_SET_PDEATHSIG" in line:
        return "agent guards (python per command)"
    # The nearest buildah (self or ancestor) with its subcommand says what this process is for.
    node, seen = pid, 0
    while node and node != root and seen < 64:
        words = lines.get(node, "").split()
        name = os.path.basename(words[0]) if words else comm.get(node, "")
        if name.startswith("buildah"):  # buildah-in-a-user-namespace: rootless buildah's re-exec
            sub = _subcommand(words) if words else "?"
            if sub == "bud":
                return "buildah bud + RUN steps"
            if sub == "push":
                return (
                    "export: buildah push oci:"
                    if any(w.startswith("oci:") for w in words)
                    else "buildah push"
                )
            if sub == "manifest":
                return "buildah manifest create/add/push"
            if sub in ("containers", "rm", "rmi"):
                return "tidy store (buildah containers/rm)"
            if sub == "unshare":
                return "containment (user/PID/net namespaces, slirp4netns)"
            if sub == "?":
                return "buildah (command line not seen)"
        if "contained-bud.sh" in " ".join(words):
            return "containment (user/PID/net namespaces, slirp4netns)"
        if node != pid and _is_agent(lines.get(node, "")):
            return "agent: node probes (mount -t overlay, docker version, ...)"
        node, seen = parent.get(node, 0), seen + 1
    words = argv or [comm.get(pid, "?")]
    if "setpriv" in words[0]:
        return "agent (stage one, agent, upload)"
    if "baseline.sh" in line:
        return "shell (baseline.sh)"
    return f"other ({os.path.basename(words[0])})"


def descendants(root: int, parent: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for child, mother in parent.items():
        children[mother].append(child)
    found, todo = {root}, [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def registry_pid() -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                line = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "docker-registry" in line and ".lab/registry" in line:
                return int(name)
    return None


def profile_side(
    side: str,
    command: list[str],
    env: dict[str, str],
    cwd: str | None,
    log: Path,
    perf_file: Path,
    registry: int | None,
) -> dict[str, object]:
    pids: list[int] = []
    with CommandLines() as lines, Perf(perf_file):
        started = time.perf_counter()
        seconds, rusage_cpu = timed(command, env, log, cwd, pids.append)
        window = time.perf_counter() - started
    parent, cpu, comm = parse_perf(perf_file)
    root = pids[0]
    tree = descendants(root, parent)
    roles: Counter[str] = Counter()
    for pid in tree:
        if pid in cpu:
            roles[classify(pid, root, parent, lines.seen, comm)] += sum(cpu[pid].values())
    registry_ns = sum(cpu[registry].values()) if registry in cpu else 0
    other_ns = sum(sum(c.values()) for pid, c in cpu.items() if pid not in tree and pid != registry)
    return {
        "seconds": seconds,
        "window": window,
        "rusage_cpu": rusage_cpu,
        "roles": {role: ns / 1e9 for role, ns in roles.items()},
        "tree_cpu": sum(roles.values()) / 1e9,
        "registry_cpu": registry_ns / 1e9,
        "other_cpu": other_ns / 1e9,
    }


# --- py-spy ----------------------------------------------------------------------------------------

# What a Python sample was doing, by the first of these found anywhere in its stack.
_COORDINATOR_PARTS = [
    ("imports (start-up and lazy)", ("_find_and_load",)),
    ("verification (read back, layers scanned)", ("farm/registry/verify.py", "farm/elf.py")),
    ("context scan", ("farm/context.py",)),
    ("index push", ("farm/stitch.py", "farm/index.py")),
    ("agent sessions (start, sync, messages)", ("farm/session.py", "farm/transport/")),
    (
        "node probe, dispatch, scheduler",
        ("farm/nodes.py", "farm/pool.py", "farm/dispatch.py", "farm/scheduler.py"),
    ),
    ("progress output", ("farm/progress.py",)),
    ("registry requests (ping, pins, auth)", ("farm/registry/",)),
    ("build plan (Dockerfile, pins, records)", ("farm/build.py", "farm/dockerfile.py")),
    ("event loop, other", ()),
]
_AGENT_PARTS = [
    ("stage one (hash, exec)", ("<string>:<module>",)),
    ("imports (start-up)", ("_find_and_load",)),
    ("upload to the registry", ("agent/upload.py",)),
    ("running builder commands (Popen, relaying output)", ("Runner.run",)),
    ("context store, sync, layout", ("agent/store.py", "Agent._sync")),
    ("main loop, heartbeats, protocol", ("agent/main.py", "agent/protocol.py")),
    ("other", ()),
]


def pyspy_breakdown(profile: Path) -> dict[str, dict[str, float]]:
    """Samples of the coordinator and of the agents, by what they were doing (seconds of samples).

    With ``--subprocesses`` each stack starts with one ``process PID:"COMMAND"`` frame per
    ancestor: a stack with one is the coordinator's, one whose last names the agent an agent's."""
    data = json.loads(profile.read_text())
    labels = [f"{frame['file']}:{frame['name']}" for frame in data["shared"]["frames"]]
    result: dict[str, Counter[str]] = {"coordinator": Counter(), "agent": Counter()}
    for item in data["profiles"]:
        match = re.match(r"Process (\d+) Thread (\d+)", item["name"])
        if not match or int(match.group(2)) < 10:
            continue  # a process in a PID namespace: py-spy cannot tell idle from busy there
        for stack, weight in zip(item["samples"], item["weights"], strict=True):
            frames = [labels[i] for i in stack]
            processes = [frame for frame in frames if frame.startswith(":process ")]
            if len(processes) == 1:
                kind, parts = "coordinator", _COORDINATOR_PARTS
            elif processes and "--workdir" in processes[-1]:
                kind, parts = "agent", _AGENT_PARTS
            else:
                continue
            for part, needles in parts:
                if not needles or any(needle in frame for frame in frames for needle in needles):
                    result[kind][part] += weight
                    break
    return {kind: dict(parts) for kind, parts in result.items()}


# --- parts, measured one at a time ------------------------------------------------------------------


def _child_cpu(argv: list[str], repeat: int = 9, env: dict[str, str] | None = None) -> float:
    """Median CPU seconds (user + system, with its children) of running ``argv``."""
    values = []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        values.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(values)


def measure_parts(farm_ref: str | None) -> dict[str, float]:
    """CPU of the pieces a cold build repeats per platform, each measured alone (median of 9)."""
    sys.path.insert(0, str(REPO))
    from agent.builders import _GUARD
    from farm.transport.bundle import agent_bundle

    python = "/usr/bin/python3"  # the agent's, on the local node
    parts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="farm-bench-parts-") as scratch:
        zipapp = Path(scratch) / "agent.pyz"
        zipapp.write_bytes(agent_bundle().data)
        compiled = Path(scratch) / "agent-compiled.pyz"
        _compiled_zipapp(python, zipapp, compiled)
        load = "import sys; sys.path.insert(0, sys.argv[1]); import agent.main"
        parts["python3 -I -c pass (interpreter start and exit)"] = _child_cpu([python, "-I", "-c", "pass"])
        parts["guard around one builder command (python3 + true)"] = _child_cpu(
            [python, "-I", "-c", _GUARD, str(os.getpid()), "true"]
        )
        parts["agent start: python3 + import agent.main from the zipapp"] = _child_cpu(
            [python, "-I", "-c", load, str(zipapp)]
        )
        parts["  the same, the zipapp holding compiled bytecode"] = _child_cpu(
            [python, "-I", "-c", load, str(compiled)]
        )
        parts["  of which import http.client (agent/upload.py)"] = (
            _child_cpu([python, "-I", "-c", "import http.client"])
            - parts["python3 -I -c pass (interpreter start and exit)"]
        )
        modules = "farm.cli, farm.build, farm.dispatch, farm.nodes, farm.session, farm.stitch"
        parts["coordinator start: python + import farm (build path)"] = _child_cpu(
            [sys.executable, "-c", f"import {modules}, farm.registry.verify, farm.transport.local"],
            env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        )
    if farm_ref:
        parts["verification of every image of the build (in-process)"] = statistics.median(
            asyncio.run(_verify_cpu(farm_ref)) for _ in range(3)
        )
    return parts


def _compiled_zipapp(python: str, source: Path, target: Path) -> None:
    """``source`` with each module's bytecode beside it (unchecked-hash .pyc), for ``python``."""
    code = (
        "import importlib.util, py_compile, sys, zipfile\n"
        "src, dst = sys.argv[1], sys.argv[2]\n"
        "with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:\n"
        "    for info in zin.infolist():\n"
        "        data = zin.read(info)\n"
        "        zout.writestr(info, data)\n"
        "        if info.filename.endswith('.py'):\n"
        "            body = compile(data, info.filename, 'exec', dont_inherit=True)\n"
        "            import marshal\n"
        "            header = importlib.util.MAGIC_NUMBER + (3).to_bytes(4, 'little') + bytes(8)\n"
        "            zout.writestr(info.filename + 'c', header + marshal.dumps(body))\n"
    )
    subprocess.run([python, "-I", "-c", code, str(source), str(target)], check=True)


async def _verify_cpu(ref: str) -> float:
    """CPU seconds (all threads) of verifying every image of the index at ``ref``, as farm does."""
    from farm.platforms import normalize
    from farm.registry.client import RegistryClient
    from farm.registry.name import parse_reference
    from farm.registry.verify import LayerScan, verify_image

    target = parse_reference(ref)
    async with RegistryClient() as client:
        index = (await client.get_manifest(target)).json()
        scans: dict[str, LayerScan] = {}
        started = time.process_time()
        await asyncio.gather(
            *(
                verify_image(
                    client,
                    target,
                    child["digest"],
                    normalize(
                        child["platform"]["os"],
                        child["platform"]["architecture"],
                        child["platform"].get("variant", ""),
                    ),
                    scans,
                )
                for child in index["manifests"]
            )
        )
        return time.process_time() - started


def run_pyspy(out: Path, farm: str, platforms: list[str], context: Path, registry: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="farm-bench-pyspy-"))
    try:
        command, env, cwd = local_build._farm_command(
            farm, work, f"{registry}/bench/farm", f"pyspy-{uuid.uuid4().hex[:8]}", platforms, context
        )
        profile = out / "farm-cold.speedscope.json"
        pyspy = str(Path(sys.executable).parent / "py-spy")
        subprocess.run(
            [pyspy, "record", "--subprocesses", "--nonblocking", "-r", "100", "-f", "speedscope",
             "-o", str(profile), "--", *command],
            env=env, cwd=cwd, check=True, capture_output=True,
        )  # fmt: skip
        return profile
    finally:
        wipe(work)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--platforms", default=local_build.DEFAULT_PLATFORMS)
    parser.add_argument("--context", default=str(REPO / "examples" / "hello"))
    parser.add_argument("--registry", default="localhost:5000")
    parser.add_argument("--pyspy", type=Path, help="also profile one farm build with py-spy, into DIR")
    parser.add_argument("--parts", action="store_true", help="also measure each repeated part alone")
    parser.add_argument("--json", help="write the breakdown as JSON here")
    args = parser.parse_args()
    if shutil.which("perf") is None or os.geteuid() != 0:
        sys.exit("cpu_profile: needs perf and root")
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    context = Path(args.context).resolve()
    farm = local_build._farm_executable(None)
    scratch = Path(tempfile.mkdtemp(prefix="farm-bench-cpu-"))
    registry = registry_pid()
    results: dict[str, list[dict[str, object]]] = {"farm": [], "baseline": []}
    last_farm_ref = None
    try:
        driver = agent_storage_driver(REPO, build_user_workdir(scratch / "probe"))
        run_id = uuid.uuid4().hex[:8]
        for number in range(1, args.rounds + 1):
            order = ("farm", "baseline") if number % 2 else ("baseline", "farm")
            for side in order:
                workdir = scratch / f"r{number}-{side}"
                workdir.mkdir(parents=True)
                repo = f"{args.registry}/bench/{side}"
                tag = f"cpu-{run_id}-r{number}"
                if side == "farm":
                    command, env, cwd = local_build._farm_command(
                        farm, workdir, repo, tag, platforms, context
                    )
                else:
                    command, env, cwd = local_build._baseline_command(
                        workdir, repo, tag, platforms, context, driver, True
                    )
                busy = busy_share()
                result = profile_side(
                    side, command, env, cwd, scratch / f"r{number}-{side}.log",
                    scratch / f"r{number}-{side}.perf", registry,
                )  # fmt: skip
                result["busy"] = busy
                results[side].append(result)
                if side == "farm":
                    last_farm_ref = f"{repo}:{tag}"
                print(
                    f"round {number} {side:<9} wall {result['seconds']:.2f} s, CPU (rusage) "
                    f"{result['rusage_cpu']:.2f} s, sampled in its tree {result['tree_cpu']:.2f} s, "
                    f"registry {result['registry_cpu']:.2f} s, other work {result['other_cpu']:.2f} s, "
                    f"busy before {busy:.0%}",
                    flush=True,
                )
                wipe(workdir)
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"cpu_profile: {exc}", file=sys.stderr)
        return 1
    finally:
        wipe(scratch)

    roles = sorted({role for side in results.values() for r in side for role in r["roles"]})  # type: ignore[attr-defined]
    print()
    print(f"median CPU seconds per role over {args.rounds} rounds ({len(platforms)} platforms)")
    print(f"{'role':<52}{'farm':>8}{'baseline':>10}{'diff':>8}")
    table = {}
    for role in [*roles, "(registry)", "(whole tree, sampled)", "(whole tree, rusage)"]:
        values = {}
        for side, runs in results.items():
            if role == "(registry)":
                values[side] = statistics.median(float(r["registry_cpu"]) for r in runs)
            elif role == "(whole tree, sampled)":
                values[side] = statistics.median(float(r["tree_cpu"]) for r in runs)
            elif role == "(whole tree, rusage)":
                values[side] = statistics.median(float(r["rusage_cpu"]) for r in runs)
            else:
                values[side] = statistics.median(float(r["roles"].get(role, 0.0)) for r in runs)  # type: ignore[attr-defined]
        table[role] = values
        difference = values["farm"] - values["baseline"]
        print(f"{role:<52}{values['farm']:>8.2f}{values['baseline']:>10.2f}{difference:>+8.2f}")
    breakdown = None
    if args.pyspy:
        profile = run_pyspy(args.pyspy, farm, platforms, context, args.registry)
        breakdown = pyspy_breakdown(profile)
        perf_cpu = {
            "coordinator": table.get("coordinator (farm process)", {}).get("farm", 0.0),
            "agent": table.get("agent (stage one, agent, upload)", {}).get("farm", 0.0),
        }
        for kind, parts in breakdown.items():
            total = sum(parts.values()) or 1.0
            print(
                f"\npy-spy, {kind}: {total:.2f} s of samples; share, and that share of the "
                f"{perf_cpu[kind]:.2f} s perf measured"
            )
            for part, value in sorted(parts.items(), key=lambda item: -item[1]):
                print(f"  {part:<52}{value / total:>6.1%}{value / total * perf_cpu[kind]:>7.2f} s")
        print(f"(speedscope profile: {profile})")
    measured = None
    if args.parts:
        measured = measure_parts(last_farm_ref)
        print("\nparts, each alone (median CPU seconds; the machine as it was):")
        for name, value in measured.items():
            print(f"  {name:<62}{value:>7.3f} s")
    write_json(
        args.json,
        "cpu_profile",
        [],
        platforms=platforms,
        rounds=results,
        medians=table,
        pyspy=breakdown,
        parts=measured,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
