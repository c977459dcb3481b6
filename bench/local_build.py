"""farm against the shell a user would write, on this machine: a cold multi-platform build, both
sides contained the same way.

    .venv/bin/python bench/local_build.py [--rounds N] [--platforms a,b,c] [--context DIR] [--json FILE]

Each round builds the same context for the same platforms twice, into the same registry but
different repositories:

  farm      ``farm build --no-cache`` with a one-node inventory (this machine, ``local: true``,
            8 slots); its agent runs as the build user ``farm-build``, rootless, every RUN step
            under ``--isolation oci`` (runc) in its own PID and network namespace (slirp4netns)
  baseline  ``bench/baseline.sh`` run as ``farm-build`` too (``setpriv``, the environment farm gives
            its agent): per platform in parallel, ``contained-bud.sh`` (the same rootless buildah,
            ``--isolation oci --runtime runc``, the same private network and PID namespace, the
            agent's ``--layers``) then ``buildah push``; then ``buildah manifest create/add/push --all``

Cold on both sides, every round: each side gets a brand-new, empty workdir and buildah storage,
made by the build user, with the storage driver farm's agent picks here (checked every round);
farm is told ``--no-cache`` (else every round after the first would reuse the first's images).
Storage is made and wiped outside the timed span. The order alternates (farm first in odd
rounds). Wall time is ``time.perf_counter`` around the whole command; CPU is user + system of the
command and every descendant it waited for. After farm's cold build, a separate, untimed-for-the-
ratio run of the same command without ``--no-cache`` measures the no-op rebuild. Afterwards, each
side's pushed index is read back and must hold exactly one image per platform, of that platform.

Targets (issue 14): median wall farm/baseline <= 0.95, median CPU farm/baseline <= 1.05. Exit 0
whether or not they are met; 1 if a command or a check fails; 2 if the lab is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from buildnode import build_user_workdir
from common import (
    BenchError,
    agent_storage_driver,
    as_build_user,
    at_most,
    build_user_env,
    busy_share,
    check_index,
    timed,
    wipe,
    write_json,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7,linux/arm/v6,linux/s390x,linux/ppc64le,linux/386"
TARGET_WALL = 0.95
TARGET_CPU = 1.05
TARGET_NOOP = 0.05  # as bench/noop_rebuild.py
BUSY_WARNING = 0.15


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
    noop: float = 0.0  # farm's no-op rebuild of the same build, seconds

    @property
    def ratio(self) -> float:
        return self.runs["farm"].seconds / self.runs["baseline"].seconds

    @property
    def cpu_ratio(self) -> float:
        return self.runs["farm"].cpu / self.runs["baseline"].cpu


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
    try:
        driver = agent_storage_driver(REPO, build_user_workdir(scratch / "probe"))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        wipe(scratch / "probe")
    print(f"context   {context}")
    print(f"platforms {','.join(platforms)} ({len(platforms)})")
    print(f"farm      {farm} build --no-cache -> {repos['farm']}")
    print(f"baseline  {BENCH / 'baseline.sh'} as farm-build -> {repos['baseline']}")
    print(f"storage   {driver} (the agent's choice here), fresh per side per round; logs in {logs}")
    print(f"layers    baseline {'with' if args.baseline_layers else 'WITHOUT'} --layers (farm's agent: with)")
    print(f"rounds    {args.rounds}; load average {os.getloadavg()[0]:.2f} at start")
    print()
    print(
        f"{'round':>5}  {'first':<9}{'farm s':>8}{'base s':>8}{'wall':>7}"
        f"{'farm cpu':>9}{'base cpu':>9}{'cpu':>7}{'busy':>6}{'no-op s':>9}"
    )

    rounds: list[Round] = []
    try:
        for number in range(1, args.rounds + 1):
            order = ("farm", "baseline") if number % 2 == 1 else ("baseline", "farm")
            current = Round(number, order)
            tag = f"{run_id}-r{number}"
            for side in order:
                workdir = scratch / f"r{number}-{side}"
                wipe(workdir)
                workdir.mkdir(parents=True)
                log = logs / f"r{number}-{side}.log"
                if side == "farm":
                    command, env, cwd = _farm_command(farm, workdir, repos["farm"], tag, platforms, context)
                else:
                    command, env, cwd = _baseline_command(
                        workdir, repos["baseline"], tag, platforms, context, driver, args.baseline_layers
                    )
                current.busy = max(current.busy, busy_share())
                seconds, cpu = timed(command, env, log, cwd)
                current.runs[side] = Run(side, seconds, cpu, log)
                if side == "farm":
                    _check_driver(workdir / "node", driver)
                    # The no-op rebuild: the same command, reuse allowed (not part of the ratio).
                    noop_command = [word for word in command if word != "--no-cache"]
                    current.noop, _ = timed(noop_command, env, logs / f"r{number}-farm-noop.log", cwd)
                if not args.keep:
                    wipe(workdir)
            for side in order:
                check_index(f"{repos[side]}:{tag}", platforms)
            rounds.append(current)
            print(
                f"{number:>5}  {order[0]:<9}{current.runs['farm'].seconds:>8.2f}"
                f"{current.runs['baseline'].seconds:>8.2f}{current.ratio:>7.3f}"
                f"{current.runs['farm'].cpu:>9.2f}{current.runs['baseline'].cpu:>9.2f}{current.cpu_ratio:>7.3f}"
                f"{current.busy:>6.0%}{current.noop:>9.2f}",
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
                    wipe(child)
            if not args.log_dir:
                wipe(logs)
            if not any(scratch.iterdir()):
                scratch.rmdir()

    median = statistics.median
    wall = median(r.ratio for r in rounds)
    cpu = median(r.cpu_ratio for r in rounds)
    noop = median(r.noop / r.runs["farm"].seconds for r in rounds)
    print()
    print(
        f"median wall time: farm {median(r.runs['farm'].seconds for r in rounds):.2f} s, "
        f"baseline {median(r.runs['baseline'].seconds for r in rounds):.2f} s"
    )
    print(
        f"median CPU time:  farm {median(r.runs['farm'].cpu for r in rounds):.2f} s, "
        f"baseline {median(r.runs['baseline'].cpu for r in rounds):.2f} s (user + system)"
    )
    if max(r.busy for r in rounds) > BUSY_WARNING:
        print("note: other work used the CPU as some runs began (busy column): expect noisy times")
    figures = [
        at_most("wall farm/baseline, cold", wall, TARGET_WALL, "x"),
        at_most("CPU farm/baseline, cold", cpu, TARGET_CPU, "x"),
        at_most("no-op/cold (farm)", noop, TARGET_NOOP, "x"),
    ]
    for item in figures:
        verdict = "met" if item["met"] else "MISSED"
        print(f"median {item['figure']}: {item['value']:.3f} (target {item['target']}: {verdict})")
    write_json(
        args.json,
        "local_build",
        figures,
        context=str(context),
        platforms=platforms,
        storage_driver=driver,
        baseline_layers=args.baseline_layers,
        rounds=[
            {
                "round": r.number,
                "first": r.order[0],
                "farm_seconds": r.runs["farm"].seconds,
                "baseline_seconds": r.runs["baseline"].seconds,
                "farm_cpu_seconds": r.runs["farm"].cpu,
                "baseline_cpu_seconds": r.runs["baseline"].cpu,
                "cpu_busy_before": r.busy,
                "ratio": r.ratio,
                "cpu_ratio": r.cpu_ratio,
                "noop_seconds": r.noop,
            }
            for r in rounds
        ],
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
    parser.add_argument(
        "--baseline-no-layers",
        dest="baseline_layers",
        action="store_false",
        help="the baseline builds without --layers (farm's agent always passes it)",
    )
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
    for tool in (farm, "buildah", "skopeo", "bash", "setpriv", "runc", "slirp4netns", "unshare"):
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


def _check_driver(workdir: Path, expected: str) -> None:
    try:
        used = (workdir / "storage" / "driver").read_text().strip()
    except OSError:
        return  # a builder without one (docker): nothing to compare
    if used != expected:
        raise BenchError(f"farm's agent used the {used} driver, the baseline {expected}: not the same work")


def _farm_command(
    farm: str, workdir: Path, repo: str, tag: str, platforms: list[str], context: Path
) -> tuple[list[str], dict[str, str], str | None]:
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
        "--no-cache",
        "--inventory", str(inventory),
        "--progress", "plain",
        str(context),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FARM_INVENTORY"}
    return command, env, None


def _baseline_command(
    workdir: Path,
    repo: str,
    tag: str,
    platforms: list[str],
    context: Path,
    driver: str,
    layers: bool,
) -> tuple[list[str], dict[str, str], str]:
    home = build_user_workdir(workdir / "baseline")
    # A copy the build user can read, made before the clock starts (farm ships its own to the agent).
    shutil.copytree(context, home / "context", symlinks=True)
    shutil.chown(home / "context", "farm-build", "farm-build")
    env = build_user_env(
        {
            "BUILDAH_ROOT": str(home / "root"),
            "BUILDAH_RUNROOT": str(home / "run"),
            "BUILDAH_DRIVER": driver,
            "BASELINE_LAYERS": "1" if layers else "0",
        }
    )
    command = as_build_user(
        ["bash", str(BENCH / "baseline.sh"), repo, tag, ",".join(platforms), str(home / "context")]
    )
    return command, env, "/"


if __name__ == "__main__":
    sys.exit(main())
