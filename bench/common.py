"""What several benchmarks share: running a command timed, as the build user, checking a pushed
index, and writing figures as JSON for ``bench/run-all``.

Every benchmark's ``--json FILE`` holds a ``figures`` list, one entry per judged (or recorded)
figure::

    {"figure": "wall farm/baseline", "value": 0.97, "unit": "x", "target": "<= 0.95", "met": false}

``target`` is null (and ``met`` null) for a figure recorded without a target.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

BUILD_USER = "farm-build"
# The PATH farm gives the local node's agent (farm/transport/local.py): the system's.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class BenchError(Exception):
    pass


# --- figures -------------------------------------------------------------------------------------


def figure(
    name: str, value: float | None, unit: str = "", target: str | None = None, met: bool | None = None
) -> dict[str, Any]:
    """One figure for ``--json``; ``target`` as text (``"<= 0.95"``), ``met`` whether it was."""
    return {"figure": name, "value": value, "unit": unit, "target": target, "met": met}


def at_most(name: str, value: float, limit: float, unit: str = "") -> dict[str, Any]:
    return figure(name, value, unit, f"<= {limit:g}{_unit(unit)}", value <= limit)


def at_least(name: str, value: float, limit: float, unit: str = "") -> dict[str, Any]:
    return figure(name, value, unit, f">= {limit:g}{_unit(unit)}", value >= limit)


def _unit(unit: str) -> str:
    return "" if unit in ("", "x") else ("" if unit == "%" else " ") + unit


def write_json(
    path: str | Path | None, benchmark: str, figures: Sequence[Mapping[str, Any]], **details: Any
) -> None:
    """Write ``{"benchmark", "date", "load", "figures", ...details}`` to ``path`` (if given)."""
    if not path:
        return
    document = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": os.getloadavg(),
        "figures": list(figures),
        **details,
    }
    Path(path).write_text(json.dumps(document, indent=2, default=str) + "\n")


# --- the build user ------------------------------------------------------------------------------


def build_user_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment farm gives the local node's agent: the build user's own, none of ours."""
    entry = pwd.getpwnam(BUILD_USER)
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def as_build_user(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the build user, the way farm starts the local agent (``setpriv``)."""
    entry = pwd.getpwnam(BUILD_USER)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *argv]


def agent_storage_driver(repo: Path, probe_dir: Path) -> str:
    """The storage driver farm's agent picks on this machine, as the build user (overlay where a
    rootless overlay mounts, else vfs): asked of ``agent.builders.storage_driver`` itself."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agent.builders import storage_driver; "
        "print(storage_driver(sys.argv[2]))"
    )
    done = subprocess.run(
        as_build_user(["/usr/bin/python3", "-I", "-c", code, str(repo), str(probe_dir)]),
        capture_output=True,
        text=True,
        env=build_user_env(),
        cwd="/",
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"cannot ask the agent for its storage driver: {done.stderr.strip()}")
    return done.stdout.strip()


# --- running and timing --------------------------------------------------------------------------


def wall_time(argv: Sequence[str]) -> float:
    """Run ``argv`` quietly and return its wall time; exit the benchmark with its error if it fails."""
    started = time.perf_counter()
    done = subprocess.run(list(argv), capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def timed(
    command: Sequence[str],
    env: Mapping[str, str] | None,
    log: Path,
    cwd: str | None = None,
    on_start: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """Run ``command`` with its output stamped into ``log``; its wall time and CPU time (user +
    system of it and every descendant that was waited for). ``on_start`` is told its pid."""
    with log.open("w") as out:
        out.write("# " + " ".join(command) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        assert process.stdout is not None
        if on_start is not None:
            on_start(process.pid)
        copier = threading.Thread(target=stamp, args=(process.stdout, out, started))
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


def stamp(stream: IO[bytes], out: IO[str], started: float) -> None:
    for raw in iter(stream.readline, b""):
        out.write(f"{time.perf_counter() - started:8.3f} {raw.decode('utf-8', 'replace').rstrip()}\n")


def busy_share(seconds: float = 1.0) -> float:
    """The share of all CPUs in use over ``seconds`` (nothing of the benchmark runs meanwhile)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total1, idle1 = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle1) / max(1, total2 - total1)


def wipe(path: Path) -> None:
    """Remove a storage folder, unmounting first what an overlay store may still have mounted."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


# --- checking what was pushed --------------------------------------------------------------------


def check_index(ref: str, platforms: Sequence[str]) -> None:
    """The registry holds an index at ``ref`` with one image of each platform, and nothing else;
    each image's config names its platform."""
    index = json.loads(skopeo("inspect", "--raw", f"docker://{ref}"))
    media_type = index.get("mediaType")
    children = index.get("manifests")
    if (media_type is not None and media_type not in INDEX_TYPES) or not isinstance(children, list):
        raise BenchError(f"{ref} is not an index ({media_type})")
    declared = sorted(platform_key(child.get("platform") or {}) for child in children)
    wanted = sorted(platform_key(split_platform(p)) for p in platforms)
    if declared != wanted:
        raise BenchError(f"{ref} lists platforms {declared}, expected {wanted}")
    name = ref.rsplit(":", 1)[0]
    for child in children:
        config = json.loads(skopeo("inspect", "--config", "--raw", f"docker://{name}@{child['digest']}"))
        if platform_key(config) != platform_key(child["platform"]):
            raise BenchError(
                f"{name}@{child['digest']} is listed as {platform_key(child['platform'])} "
                f"but its config says {platform_key(config)}"
            )


def skopeo(*args: str) -> str:
    done = subprocess.run(
        ["skopeo", *args[:-1], "--tls-verify=false", args[-1]], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"skopeo {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def split_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    return {"os": parts[0], "architecture": parts[1], "variant": parts[2] if len(parts) > 2 else ""}


def platform_key(declared: Mapping[str, object]) -> str:
    os_name = str(declared.get("os", ""))
    arch = str(declared.get("architecture", ""))
    variant = str(declared.get("variant", "") or "")
    if arch == "arm64" and variant == "v8":
        variant = ""  # linux/arm64 and linux/arm64/v8 are the same platform
    return "/".join(part for part in (os_name, arch, variant) if part)
