"""farm against the shell a user would write, on this machine: median wall-time ratio farm/baseline.

    .venv/bin/python bench/local_build.py [--rounds N] [--platforms a,b,c] [--context DIR]

Each round builds the same context for the same platforms twice, into the same registry but
different repositories:

  farm      ``farm build`` with a one-node inventory (this machine, ``local: true``, 8 slots)
  baseline  ``bench/baseline.sh``: buildah bud + push per platform in parallel, then
            ``buildah manifest create/add/push --all``

Fairness: every round, each side gets a brand-new, empty buildah storage (farm's through the
node's ``workdir:``, which also holds its context store; the baseline's through ``--root`` and
``--runroot``). Both therefore pull the base image and build every step from nothing, every round.
The storage is made and wiped outside the timed span. The order alternates (farm first in odd
rounds, baseline first in even rounds) so neither side always gets the warmer page cache. Wall
time is ``time.perf_counter`` around the whole command. Afterwards, outside the timing, each
side's pushed index is read back from the registry with skopeo and must hold exactly one image
per requested platform, each with an image config of that platform: the two sides did equal work.

The benchmark exits 0 whether or not the target (median ratio <= 1.0) is met; non-zero only if a
command or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from buildnode import build_user_workdir

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7,linux/arm/v6,linux/s390x,linux/ppc64le,linux/386"
TARGET_RATIO = 1.0
BUSY_WARNING = 0.15

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class BenchError(Exception):
    pass


@dataclass
class Run:
    side: str
    seconds: float
    cpu: float  # user + system seconds of the command and every descendant it waited for
    log: Path


@dataclass
class Round:
    number: int
    order: tuple[str, str]
    busy: float = 0.0  # highest share of CPU in use just before a side started: other work skews times
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.runs["farm"].seconds / self.runs["baseline"].seconds


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    context = Path(args.context).resolve()
    if not (context / "Dockerfile").is_file():
        print(f"bench: {context} has no Dockerfile", file=sys.stderr)
        return 2
    farm = _farm_executable(args.farm)
    try:
        _check_tools(farm)
        _check_registry(args.registry)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="farm-bench-local-", dir=args.scratch))
    logs = Path(args.log_dir).resolve() if args.log_dir else scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    repos = {
        "farm": f"{args.registry}/{args.repo_prefix}/farm",
        "baseline": f"{args.registry}/{args.repo_prefix}/baseline",
    }
    print(f"context   {context}")
    print(f"platforms {','.join(platforms)} ({len(platforms)})")
    print(f"farm      {farm} -> {repos['farm']}")
    print(f"baseline  {BENCH / 'baseline.sh'} -> {repos['baseline']}")
    print(f"rounds    {args.rounds}, fresh buildah storage per side per round, logs in {logs}")
    print()
    print(
        f"{'round':>5}  {'first':<9}{'farm s':>9}{'baseline s':>12}{'farm/base':>11}"
        f"{'farm cpu s':>12}{'base cpu s':>12}{'busy':>6}"
    )

    rounds: list[Round] = []
    try:
        for number in range(1, args.rounds + 1):
            order = ("farm", "baseline") if number % 2 == 1 else ("baseline", "farm")
            current = Round(number, order)
            tag = f"{run_id}-r{number}"
            for side in order:
                workdir = scratch / f"r{number}-{side}"
                _wipe(workdir)
                workdir.mkdir(parents=True)
                log = logs / f"r{number}-{side}.log"
                current.busy = max(current.busy, _busy_share())
                if side == "farm":
                    command, env = _farm_command(farm, workdir, repos["farm"], tag, platforms, context)
                else:
                    command, env = _baseline_command(workdir, repos["baseline"], tag, platforms, context)
                seconds, cpu = _timed(command, env, log)
                current.runs[side] = Run(side, seconds, cpu, log)
                if not args.keep:
                    _wipe(workdir)
            for side in order:
                _check_index(f"{repos[side]}:{tag}", platforms)
            rounds.append(current)
            print(
                f"{number:>5}  {order[0]:<9}{current.runs['farm'].seconds:>9.2f}"
                f"{current.runs['baseline'].seconds:>12.2f}{current.ratio:>11.3f}"
                f"{current.runs['farm'].cpu:>12.2f}{current.runs['baseline'].cpu:>12.2f}{current.busy:>6.0%}",
                flush=True,
            )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        print(f"bench: logs kept in {logs}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            for child in scratch.iterdir():
                if child != logs:
                    _wipe(child)
            if not any(scratch.iterdir()):
                scratch.rmdir()

    ratios = [r.ratio for r in rounds]
    median = statistics.median(ratios)
    farm_median = statistics.median(r.runs["farm"].seconds for r in rounds)
    base_median = statistics.median(r.runs["baseline"].seconds for r in rounds)
    print()
    farm_cpu = statistics.median(r.runs["farm"].cpu for r in rounds)
    base_cpu = statistics.median(r.runs["baseline"].cpu for r in rounds)
    print(f"median wall time: farm {farm_median:.2f} s, baseline {base_median:.2f} s")
    print(f"median CPU time:  farm {farm_cpu:.2f} s, baseline {base_cpu:.2f} s (user + system)")
    if max(r.busy for r in rounds) > BUSY_WARNING:
        print("note: other work used the CPU as some runs began (busy column): expect noisy times")
    print(
        f"median farm/baseline ratio: {median:.3f} (target <= {TARGET_RATIO}: "
        f"{'met' if median <= TARGET_RATIO else 'NOT met'})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "context": str(context),
                    "platforms": platforms,
                    "rounds": [
                        {
                            "round": r.number,
                            "first": r.order[0],
                            "farm_seconds": r.runs["farm"].seconds,
                            "baseline_seconds": r.runs["baseline"].seconds,
                            "farm_cpu_seconds": r.runs["farm"].cpu,
                            "baseline_cpu_seconds": r.runs["baseline"].cpu,
                            "cpu_busy_before": r.busy,
                            "ratio": r.ratio,
                        }
                        for r in rounds
                    ],
                    "median_ratio": median,
                    "target": TARGET_RATIO,
                    "met": median <= TARGET_RATIO,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--platforms", default=DEFAULT_PLATFORMS, help="comma separated")
    parser.add_argument("--context", default=str(REPO / "examples" / "hello"))
    parser.add_argument("--registry", default="localhost:5000", help="plain-HTTP registry host:port")
    parser.add_argument("--repo-prefix", default="bench", help="repositories REGISTRY/PREFIX/{farm,baseline}")
    parser.add_argument("--farm", help="farm executable (default: the one next to this Python)")
    parser.add_argument("--scratch", help="where the per-round storage goes (default: $TMPDIR)")
    parser.add_argument("--log-dir", help="keep each run's timestamped output here")
    parser.add_argument("--keep", action="store_true", help="keep the per-round storage folders")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _farm_executable(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "farm"
    return str(beside) if beside.exists() else (shutil.which("farm") or "farm")


def _check_tools(farm: str) -> None:
    for tool in (farm, "buildah", "skopeo", "bash"):
        if shutil.which(tool) is None and not Path(tool).is_file():
            raise BenchError(f"{tool} not found (run deploy/lab/setup.sh and install farm into .venv)")


def _check_registry(registry: str) -> None:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/", timeout=5) as response:
            response.read()
    except (OSError, urllib.error.URLError) as exc:
        raise BenchError(
            f"no registry answers at http://{registry}/v2/ ({exc}); run deploy/lab/setup.sh"
        ) from exc


def _farm_command(
    farm: str, workdir: Path, repo: str, tag: str, platforms: list[str], context: Path
) -> tuple[list[str], dict[str, str]]:
    inventory = workdir / "inventory.yaml"
    inventory.write_text(
        "nodes:\n"
        "  - name: local\n"
        "    local: true\n"
        "    slots: 8\n"
        "    emulation: true\n"
        "    builder: buildah\n"
        f"    workdir: {build_user_workdir(workdir / 'node')}\n"
    )
    command = [
        farm, "build",
        "-t", f"{repo}:{tag}",
        "--platform", ",".join(platforms),
        "--inventory", str(inventory),
        "--progress", "plain",
        str(context),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FARM_INVENTORY"}
    return command, env


def _baseline_command(
    workdir: Path, repo: str, tag: str, platforms: list[str], context: Path
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env["BUILDAH_ROOT"] = str(workdir / "root")
    env["BUILDAH_RUNROOT"] = str(workdir / "run")
    return ["bash", str(BENCH / "baseline.sh"), repo, tag, ",".join(platforms), str(context)], env


def _timed(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``command`` with its output stamped into ``log``; its wall time and CPU time."""
    with log.open("w") as out:
        out.write("# " + " ".join(command) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert process.stdout is not None
        copier = threading.Thread(target=_stamp, args=(process.stdout, out, started))
        copier.start()
        code = process.wait()
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        copier.join()
        out.write(f"# exit {code} after {seconds:.3f} s, {cpu:.3f} s CPU\n")
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise BenchError(f"{command[0]} exited with {code}:\n  " + "\n  ".join(tail))
    return seconds, cpu


def _busy_share(seconds: float = 1.0) -> float:
    """The share of all CPUs in use over ``seconds`` (nothing of the benchmark runs meanwhile)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total1, idle1 = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle1) / max(1, total2 - total1)


def _stamp(stream: IO[bytes], out: IO[str], started: float) -> None:
    for raw in iter(stream.readline, b""):
        out.write(f"{time.perf_counter() - started:8.3f} {raw.decode('utf-8', 'replace').rstrip()}\n")


def _check_index(ref: str, platforms: list[str]) -> None:
    """The registry holds an index at ``ref`` with one image of each platform, and nothing else."""
    index = json.loads(_skopeo("inspect", "--raw", f"docker://{ref}"))
    media_type = index.get("mediaType")
    children = index.get("manifests")
    if (media_type is not None and media_type not in INDEX_TYPES) or not isinstance(children, list):
        raise BenchError(f"{ref} is not an index ({media_type})")
    declared = sorted(_platform_key(child.get("platform") or {}) for child in children)
    wanted = sorted(_platform_key(_split(p)) for p in platforms)
    if declared != wanted:
        raise BenchError(f"{ref} lists platforms {declared}, expected {wanted}")
    name = ref.rsplit(":", 1)[0]
    for child in children:
        config = json.loads(_skopeo("inspect", "--config", "--raw", f"docker://{name}@{child['digest']}"))
        if _platform_key(config) != _platform_key(child["platform"]):
            raise BenchError(
                f"{name}@{child['digest']} is listed as {_platform_key(child['platform'])} "
                f"but its config says {_platform_key(config)}"
            )


def _skopeo(*args: str) -> str:
    done = subprocess.run(
        ["skopeo", *args[:-1], "--tls-verify=false", args[-1]], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"skopeo {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _split(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    return {"os": parts[0], "architecture": parts[1], "variant": parts[2] if len(parts) > 2 else ""}


def _platform_key(declared: Mapping[str, object]) -> str:
    os_name = str(declared.get("os", ""))
    arch = str(declared.get("architecture", ""))
    variant = str(declared.get("variant", "") or "")
    if arch == "arm64" and variant == "v8":
        variant = ""  # linux/arm64 and linux/arm64/v8 are the same platform
    return "/".join(part for part in (os_name, arch, variant) if part)


def _wipe(path: Path) -> None:
    """Remove a storage folder, unmounting first what an overlay store may still have mounted."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(path)


if __name__ == "__main__":
    sys.exit(main())
