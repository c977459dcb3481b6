"""Stitching an 8-platform index whose children sit in another repository: farm vs the shell.

The sources are eight single-platform images in ``bench/stitch-src`` (the seven children of the
lab's busybox index, plus an arm/v5 image made from the arm/v6 one). Each round stitches them
into a fresh repository, both ways, in alternating order:

* farm: ``farm imagetools create -t DST:TAG SRC@D1 ... SRC@D8`` (mounts the blobs, copies the
  manifests' bytes, verifies every child, pushes the index);
* the baseline a user would write: ``skopeo copy`` of each child into the destination, then
  ``buildah manifest create``, ``buildah manifest add`` for each, ``buildah manifest push --all``.

Prints each round and the median wall-time ratio farm/baseline. Target: <= 0.5.

    .venv/bin/python bench/stitch.py [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from common import at_most, write_json

REPO = Path(__file__).resolve().parent.parent
SOURCE = "bench/stitch-src"
TARGET = 0.5
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"


def prepare(registry: str) -> list[str]:
    """The eight source digests in ``SOURCE`` (made once; idempotent)."""
    api = f"http://{registry}/v2"
    with httpx.Client(timeout=60) as http:
        index = http.get(f"{api}/library/busybox/manifests/latest", headers={"Accept": ACCEPT}).json()
        digests = []
        for child in index["manifests"]:
            digest = child["digest"]
            _copy_manifest(http, api, "library/busybox", digest)
            digests.append(digest)
            if child["platform"].get("variant") == "v6":
                digests.append(_arm_v5_from(http, api, digest))
    if len(digests) != 8:
        sys.exit(f"expected 8 source images, made {len(digests)}")
    return digests


def _copy_manifest(http: httpx.Client, api: str, source: str, digest: str) -> None:
    response = http.get(f"{api}/{source}/manifests/{digest}", headers={"Accept": ACCEPT})
    manifest = response.json()
    for blob in [manifest["config"], *manifest["layers"]]:
        http.post(f"{api}/{SOURCE}/blobs/uploads/?mount={blob['digest']}&from={source}")
    http.put(
        f"{api}/{SOURCE}/manifests/{digest}",
        content=response.content,
        headers={"Content-Type": response.headers["content-type"]},
    ).raise_for_status()


def _arm_v5_from(http: httpx.Client, api: str, v6: str) -> str:
    manifest = http.get(f"{api}/{SOURCE}/manifests/{v6}", headers={"Accept": ACCEPT}).json()
    config = http.get(f"{api}/{SOURCE}/blobs/{manifest['config']['digest']}").json()
    config["variant"] = "v5"
    config_bytes = json.dumps(config).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    upload = http.post(f"{api}/{SOURCE}/blobs/uploads/")
    location = str(upload.url.join(upload.headers["location"]))
    separator = "&" if "?" in location else "?"
    http.put(f"{location}{separator}digest={config_digest}", content=config_bytes).raise_for_status()
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(config_bytes)}
    raw = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    http.put(
        f"{api}/{SOURCE}/manifests/{digest}", content=raw, headers={"Content-Type": manifest["mediaType"]}
    ).raise_for_status()
    return digest


def run_farm(registry: str, digests: list[str], target: str) -> None:
    sources = [f"{registry}/{SOURCE}@{digest}" for digest in digests]
    _run([str(REPO / ".venv" / "bin" / "farm"), "imagetools", "create", "-t", target, *sources])


def run_baseline(registry: str, digests: list[str], target: str, scratch: Path) -> None:
    name = target.rsplit(":", 1)[0]
    storage = ["--root", str(scratch / "root"), "--runroot", str(scratch / "run"), "--storage-driver", "vfs"]
    for number, digest in enumerate(digests):
        _run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
              f"docker://{registry}/{SOURCE}@{digest}", f"docker://{name}:part-{number}"])  # fmt: skip
    listing = f"stitch-{uuid.uuid4().hex[:8]}"
    _run(["buildah", *storage, "manifest", "create", listing])
    for digest in digests:
        _run(
            [
                "buildah",
                *storage,
                "manifest",
                "add",
                "--tls-verify=false",
                listing,
                f"docker://{name}@{digest}",
            ]
        )
    _run(
        [
            "buildah",
            *storage,
            "manifest",
            "push",
            "--all",
            "--tls-verify=false",
            listing,
            f"docker://{target}",
        ]
    )


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def check(registry: str, target: str) -> None:
    name, tag = target.split("/", 1)[1].rsplit(":", 1)
    index = httpx.get(f"http://{registry}/v2/{name}/manifests/{tag}", headers={"Accept": ACCEPT}).json()
    if len(index["manifests"]) != 8:
        sys.exit(f"{target} holds {len(index['manifests'])} images, not 8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--registry", default="localhost:5000")
    parser.add_argument("--json", help="write the figure and rounds as JSON here")
    args = parser.parse_args()
    digests = prepare(args.registry)
    ratios = []
    rounds = []
    print(f"{'round':>5}  {'first':<9} {'farm s':>7}  {'baseline s':>10}  {'farm/base':>9}")
    for number in range(1, args.rounds + 1):
        run_id = uuid.uuid4().hex[:10]
        farm_target = f"{args.registry}/bench/stitch-farm-{run_id}:1"
        base_target = f"{args.registry}/bench/stitch-base-{run_id}:1"
        times: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="farm-bench-stitch-") as scratch:
            order = ["farm", "baseline"] if number % 2 else ["baseline", "farm"]
            for side in order:
                started = time.perf_counter()
                if side == "farm":
                    run_farm(args.registry, digests, farm_target)
                else:
                    run_baseline(args.registry, digests, base_target, Path(scratch))
                times[side] = time.perf_counter() - started
        check(args.registry, farm_target)
        check(args.registry, base_target)
        ratio = times["farm"] / times["baseline"]
        ratios.append(ratio)
        rounds.append(
            {"round": number, "first": order[0], **{f"{k}_s": v for k, v in times.items()}, "ratio": ratio}
        )
        print(f"{number:>5}  {order[0]:<9} {times['farm']:>7.2f}  {times['baseline']:>10.2f}  {ratio:>9.3f}")
    median = statistics.median(ratios)
    verdict = "met" if median <= TARGET else "NOT met"
    print(f"median farm/baseline ratio: {median:.3f} (target <= {TARGET}: {verdict})")
    write_json(args.json, "stitch", [at_most("farm/baseline", median, TARGET, "x")], rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
