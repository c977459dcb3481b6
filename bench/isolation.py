"""What containing a build costs: a cold ``farm build`` with RUN steps sandboxed (the default) against
the same build without the sandbox, on this machine's local node.

    .venv/bin/python bench/isolation.py [--rounds 5] [--platforms linux/amd64,linux/arm64] [--json FILE]

  contained    the default: each RUN step under ``--isolation oci`` (runc) in a PID namespace and a
               network namespace of its own (slirp4netns), the builder in a PID namespace
  uncontained  the node set to ``isolation: chroot`` and the build to ``--network host``: what farm
               did before builds were contained (no sandbox; the README says why that is unsafe)

Both sides run as the unprivileged build user with a rootless buildah, so only the sandbox
differs. Cold on both sides: each round copies examples/hello with a fresh nonce, builds it with
``--no-cache`` on a node with a brand-new workdir (no layer cache, no context), into a new tag.
Workdirs are made and wiped outside the timed span; the order alternates every round. Wall time
is ``time.perf_counter`` around the whole ``farm`` process.

No target: the figure is what the sandbox costs, recorded in bench/README. Needs the lab
(deploy/lab/setup.sh): the registry on localhost:5000 with the seeded busybox base.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from buildnode import build_user_workdir, remove
from common import figure, wall_time, write_json

REPO = Path(__file__).resolve().parent.parent
SIDES = {
    "contained": ("", []),
    "uncontained": ("    isolation: chroot\n", ["--network", "host"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--platforms", default="linux/amd64,linux/arm64")
    parser.add_argument("--registry", default="localhost:5000")
    parser.add_argument("--json", help="write the figure and rounds as JSON here")
    args = parser.parse_args()
    farm = str(REPO / ".venv" / "bin" / "farm")
    ratios = []
    rounds = []
    print(f"{'round':>5}  {'first':<12}{'contained s':>12}{'uncontained s':>14}{'ratio':>8}")
    for number in range(1, args.rounds + 1):
        order = list(SIDES) if number % 2 else list(reversed(SIDES))
        seconds: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="farm-bench-isolation-") as scratch:
            root = Path(scratch)
            for side in order:
                node_fields, flags = SIDES[side]
                context = root / side / "hello"
                shutil.copytree(REPO / "examples" / "hello", context)
                (context / "nonce").write_text(uuid.uuid4().hex)
                workdir = build_user_workdir(root / side / "node")
                inventory = root / side / "inventory.yaml"
                inventory.write_text(
                    "nodes:\n  - name: local\n    local: true\n    slots: 8\n"
                    f"    workdir: {workdir}\n{node_fields}"
                )
                seconds[side] = wall_time(
                    [
                        farm, "build", "-t", f"{args.registry}/bench/isolation:{uuid.uuid4().hex[:12]}",
                        "--platform", args.platforms, "--no-cache", "--progress", "plain",
                        "--inventory", str(inventory), *flags, str(context),
                    ]
                )  # fmt: skip
                remove(workdir)
        ratio = seconds["contained"] / seconds["uncontained"]
        ratios.append(ratio)
        rounds.append({"round": number, "first": order[0], **{f"{k}_s": v for k, v in seconds.items()}})
        print(
            f"{number:>5}  {order[0]:<12}{seconds['contained']:>12.2f}"
            f"{seconds['uncontained']:>14.2f}{ratio:>8.3f}",
            flush=True,
        )
    print(
        f"median contained/uncontained wall time: {statistics.median(ratios):.3f} "
        "(no target: the sandbox's cost)"
    )
    median = statistics.median(ratios)
    write_json(args.json, "isolation", [figure("contained/uncontained", median, "x")], rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
