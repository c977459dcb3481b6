"""``farm serve`` under load: concurrent clients submitting no-op builds.

A ``farm serve`` with a fresh state folder and one local node (a fresh workdir) is started on a
free loopback port. One small context (busybox from the lab registry, a nonce file) is built once
through it with ``farm build --server``, which also sends the context; every later build of it
is a no-op (every platform unchanged and still in the registry: nothing is dispatched). Then
``--clients`` concurrent clients (httpx, asyncio) submit ``--builds`` builds of that context in
all, each ``POST /api/builds`` then following ``GET /api/builds/{id}/events`` to the end and
checking the build succeeded.

    .venv/bin/python bench/serve.py [--builds 500] [--clients 20] [--registry localhost:5000] [--json FILE]

Prints the submit latency (the time of ``POST /api/builds``) p50/p99, completed builds per
second (over the whole load), and the server's peak memory (VmHWM of its process). Targets:
p99 <= 50 ms, peak memory <= 300 MB. Exits 1 when a target is missed or a build fails.
Needs the lab (deploy/lab/setup.sh): the registry on localhost:5000 with the seeded busybox base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from buildnode import build_user_workdir
from common import at_most, write_json

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farm.api import BuildOptions  # noqa: E402
from farm.platforms import parse_platform  # noqa: E402

P99_TARGET_MS = 50.0
MEMORY_TARGET_MB = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def unmount_below(path: Path) -> None:
    """Overlay storage may keep layers mounted under the node's workdir; let the folder go."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def start_server(root: Path, registry: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    inventory = root / "inventory.yaml"
    workdir = build_user_workdir(root / "node")
    inventory.write_text(
        f'nodes:\n  - name: "local"\n    local: true\n    slots: 8\n    workdir: {json.dumps(str(workdir))}\n'
    )
    state = root / "state"
    port = free_port()
    log = root / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "farm", "serve", "--listen", f"127.0.0.1:{port}",
                "--inventory", str(inventory), "--state-dir", str(state), "--allow-registry", registry,
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"farm serve exited {process.returncode}:\n{log.read_text()}")
        token_file = state / "token"
        if token_file.exists():
            token = token_file.read_text().strip()
            try:
                reply = httpx.get(url + "/api/server", headers={"Authorization": f"Bearer {token}"})
                if reply.status_code == 200:
                    return process, url, token, log
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    process.kill()
    sys.exit(f"farm serve did not answer within 30 s:\n{log.read_text()}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def load(
    url: str, token: str, body: dict[str, object], builds: int, clients: int
) -> tuple[list[float], list[bool], list[str], float]:
    """Submit ``builds`` builds from ``clients`` concurrent clients.

    Returns each submit's seconds, whether it was its client's first, the failures, the wall time.
    """
    latencies: list[float] = []
    opening: list[bool] = []  # each client's first submit: all at once, on fresh connections
    failures: list[str] = []
    todo = iter(range(builds))
    headers = {"Authorization": f"Bearer {token}"}

    async def client(number: int, http: httpx.AsyncClient) -> None:
        async with http:
            for count, _ in enumerate(todo):
                payload = {**body, "submitter": f"client-{number}"}
                started = time.perf_counter()
                reply = await http.post("/api/builds", json=payload)
                latencies.append(time.perf_counter() - started)
                opening.append(count == 0)
                if reply.status_code != 201:
                    failures.append(f"submit {reply.status_code}: {reply.text[:300]}")
                    continue
                build_id = reply.json()["id"]
                last: dict[str, object] = {}
                async with http.stream("GET", f"/api/builds/{build_id}/events") as stream:
                    async for line in stream.aiter_lines():
                        if line:
                            last = json.loads(line)
                if last.get("type") != "result":
                    failures.append(f"{build_id}: {json.dumps(last)[:300]}")
                    continue
                status = (await http.get(f"/api/builds/{build_id}")).json()
                if status["state"] != "succeeded":
                    failures.append(f"{build_id}: {status['state']} {status.get('error')}")

    # One connection pool per client, as separate CI jobs would have; all made before the clock
    # starts (each loads a trust store, ~20 ms, which would stall the other clients' timings).
    pools = [httpx.AsyncClient(base_url=url, headers=headers, timeout=120) for _ in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(client(n, http) for n, http in enumerate(pools)))
    return latencies, opening, failures, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--builds", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--registry", default="localhost:5000")
    parser.add_argument("--platform", default="linux/amd64", help="platforms of the build, comma-separated")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="farm-bench-serve-") as scratch:
        root = Path(scratch)
        process, url, token, log = start_server(root, args.registry)
        try:
            context = root / "ctx"
            context.mkdir()
            (context / "Dockerfile").write_text(
                f"FROM {args.registry}/library/busybox\nCOPY nonce.txt /nonce.txt\n"
            )
            (context / "nonce.txt").write_text(f"{uuid.uuid4()}\n")
            tag = f"{args.registry}/bench/serve:{uuid.uuid4().hex[:8]}"
            env = {**os.environ, "FARM_SERVER": url, "FARM_SERVER_TOKEN": token, "FARM_SUBMITTER": "bench"}
            started = time.perf_counter()
            first = subprocess.run(
                [sys.executable, "-m", "farm", "build", "-t", tag, "--platform", args.platform, str(context)],
                capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
            )  # fmt: skip
            if first.returncode != 0:
                sys.exit(f"the first build failed:\n{first.stderr[-3000:]}")
            print(f"first build (cold, context sent): {time.perf_counter() - started:.1f} s")
            headers = {"Authorization": f"Bearer {token}"}
            [built] = httpx.get(url + "/api/builds", params={"limit": 1}, headers=headers).json()["builds"]
            options = BuildOptions(
                tags=(tag,),
                platforms=tuple(parse_platform(p) for p in args.platform.split(",")),
            ).model_dump(mode="json")
            body = {
                "context": built["context"],
                "options": options,
                "dockerfile": (context / "Dockerfile").read_text(),
            }
            rss_before = memory_kb(process.pid, "VmRSS") / 1024
            latencies, opening, failures, wall = asyncio.run(
                load(url, token, body, args.builds, args.clients)
            )
            if process.poll() is not None:
                sys.exit(f"farm serve died under load:\n{log.read_text()[-3000:]}")
            peak = memory_kb(process.pid, "VmHWM") / 1024
            rss_after = memory_kb(process.pid, "VmRSS") / 1024
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            unmount_below(root)

    completed = len(latencies) - len(failures)
    p50 = statistics.median(latencies) * 1000
    p99 = percentile(latencies, 0.99) * 1000
    steady = [seconds for seconds, first in zip(latencies, opening, strict=True) if not first] or latencies
    steady_p99 = percentile(steady, 0.99) * 1000
    print(f"{args.builds} no-op builds from {args.clients} concurrent clients in {wall:.1f} s")
    print(f"submit latency   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   max {max(latencies) * 1000:7.1f} ms")
    print(f"                 p99 {steady_p99:7.1f} ms leaving out the opening burst (each client's first)")
    print(
        f"completed        {completed / wall:7.1f} builds/s ({completed} succeeded, {len(failures)} failed)"
    )
    print(
        f"server memory    peak {peak:7.1f} MB (VmHWM), RSS {rss_before:.1f} MB before, {rss_after:.1f} after"
    )
    for failure in failures[:5]:
        print(f"  failed: {failure}")
    ok_latency = p99 <= P99_TARGET_MS
    ok_memory = peak <= MEMORY_TARGET_MB
    print(f"target p99 <= {P99_TARGET_MS:.0f} ms: {'met' if ok_latency else 'MISSED'}")
    print(f"target peak memory <= {MEMORY_TARGET_MB:.0f} MB: {'met' if ok_memory else 'MISSED'}")
    write_json(
        args.json,
        "serve",
        [
            at_most("submit p99", p99, P99_TARGET_MS, "ms"),
            at_most("peak memory", peak, MEMORY_TARGET_MB, "MB"),
        ],
        builds=args.builds,
        clients=args.clients,
        p50_ms=p50,
        steady_p99_ms=steady_p99,
        builds_per_s=completed / wall,
        failures=failures[:20],
    )
    return 0 if ok_latency and ok_memory and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
