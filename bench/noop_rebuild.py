"""An unchanged ``farm build`` as a fraction of the cold build it repeats.

Each round copies examples/hello with a fresh nonce file (so no earlier build matches), builds it
for seven platforms on a node with an empty workdir (cold: no layer cache, no context on the
node), then runs the very same command again (no-op: every platform is reused, nothing is
dispatched). Both are timed around the whole ``farm`` process, as a user or CI would see them.

    .venv/bin/python bench/noop_rebuild.py [--rounds 3] [--json FILE]

Target: no-op / cold <= 0.05. Needs the lab (deploy/lab/setup.sh): the registry on
localhost:5000 with the seeded busybox base.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from buildnode import build_user_workdir
from common import at_most, wall_time, write_json

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7,linux/arm/v6,linux/s390x,linux/ppc64le,linux/386"
TARGET = 0.05


def _unmount_below(path: Path) -> None:
    """Overlay storage may keep layers mounted under the node's workdir; let the folder go."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--registry", default="localhost:5000")
    parser.add_argument("--json", help="write the figure and rounds as JSON here")
    args = parser.parse_args()
    farm = str(REPO / ".venv" / "bin" / "farm")
    ratios = []
    rounds = []
    print(f"{'round':>5}  {'cold s':>8}  {'no-op s':>8}  {'no-op/cold':>10}")
    for number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="farm-bench-noop-") as scratch:
            root = Path(scratch)
            context = root / "hello"
            shutil.copytree(REPO / "examples" / "hello", context)
            (context / "nonce").write_text(uuid.uuid4().hex)
            inventory = root / "inventory.yaml"
            inventory.write_text(
                f"nodes:\n  - name: local\n    local: true\n    slots: 8\n"
                f"    workdir: {build_user_workdir(root / 'node')}\n"
            )
            command = [
                farm, "build", "-t", f"{args.registry}/bench/noop:{uuid.uuid4().hex[:12]}",
                "--platform", PLATFORMS, "--progress", "plain", "--inventory", str(inventory), str(context),
            ]  # fmt: skip
            cold = wall_time(command)
            noop = wall_time(command)
            _unmount_below(root)
        ratios.append(noop / cold)
        rounds.append({"round": number, "cold_s": cold, "noop_s": noop, "ratio": noop / cold})
        print(f"{number:>5}  {cold:>8.2f}  {noop:>8.2f}  {noop / cold:>10.3f}")
    median = statistics.median(ratios)
    verdict = "met" if median <= TARGET else "NOT met"
    print(f"median no-op/cold ratio: {median:.3f} (target <= {TARGET}: {verdict})")
    write_json(args.json, "noop_rebuild", [at_most("no-op/cold", median, TARGET, "x")], rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
