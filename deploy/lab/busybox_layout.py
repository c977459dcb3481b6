#!/usr/bin/env python3
"""Write a multi-platform busybox base image as an OCI image layout, without Docker Hub.

The lab machines reach Debian's and PyPI's package registries and nothing else, so the usual
``docker pull busybox`` cannot work, and neither can a Dockerfile ``FROM`` anything public. Debian
ships a static busybox for every architecture it supports (``busybox-static``); one layer holding
``/bin/busybox`` plus a symlink per applet is a working base image with a shell. This script turns
those ``.deb`` files into an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``)
whose ``index.json`` names ONE multi-platform image index, tagged ``latest``. ``skopeo copy --all
oci:DIR:latest docker://REGISTRY/library/busybox:latest`` then seeds a registry with it.

Everything is deterministic (sorted tar entries, mtime 0, uid/gid 0, gzip mtime 0 and no file
name), so the same ``.deb`` files always give the same digests, and re-seeding is a no-op.

Input: a folder holding, per architecture, either ``busybox-static_*_<debarch>.deb`` (extracted
with ``dpkg-deb -x``) or an already extracted ``<debarch>/bin/busybox``. The applet list comes from
the native amd64 busybox (``busybox --list-full``), so this must run on an x86_64 host; the list is
the same for every architecture of one Debian build.

Python standard library only: it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PLATFORMS", "DebPlatform", "LayoutError", "build_layout", "main"]

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

CREATED_BY = "farm deploy/lab/busybox_layout.py"
ENV_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX = "bin/busybox"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
GROUP = b"root:x:0:\n"


class LayoutError(Exception):
    """The input folder cannot make the layout; the message says what to fetch."""


@dataclass(frozen=True)
class DebPlatform:
    """One Debian architecture and the OCI platform its binaries run on."""

    debarch: str
    architecture: str
    variant: str = ""

    @property
    def name(self) -> str:
        parts = ["linux", self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    def descriptor(self) -> dict[str, str]:
        """The ``platform`` object of an image index descriptor."""
        fields = {"architecture": self.architecture, "os": "linux"}
        if self.variant:
            fields["variant"] = self.variant
        return fields


# Index order is this order. amd64 first: it is also where the applet list comes from.
PLATFORMS: tuple[DebPlatform, ...] = (
    DebPlatform("amd64", "amd64"),
    DebPlatform("arm64", "arm64"),
    DebPlatform("armhf", "arm", "v7"),
    DebPlatform("armel", "arm", "v6"),
    DebPlatform("s390x", "s390x"),
    DebPlatform("ppc64el", "ppc64le"),
    DebPlatform("i386", "386"),
)
NATIVE = "amd64"


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _BlobStore:
    """The ``blobs/sha256`` folder of a layout; returns a descriptor for each blob written."""

    def __init__(self, root: Path) -> None:
        self._dir = root / "blobs" / "sha256"
        self._dir.mkdir(parents=True, exist_ok=True)

    def put(self, media_type: str, data: bytes) -> dict[str, object]:
        digest = _sha256(data)
        (self._dir / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _find_busybox(source: Path, debarch: str, scratch: Path) -> Path:
    """The busybox binary for ``debarch``: from its ``.deb`` if there is one, else extracted."""
    debs = sorted(source.glob(f"busybox-static_*_{debarch}.deb"))
    if len(debs) > 1:
        raise LayoutError(f"more than one busybox-static .deb for {debarch} in {source}: {debs}")
    if debs:
        target = scratch / debarch
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True)
    else:
        target = source / debarch
    binary = target / BUSYBOX
    if not binary.is_file():
        raise LayoutError(
            f"no busybox for {debarch}: expected busybox-static_*_{debarch}.deb or "
            f"{debarch}/{BUSYBOX} in {source} (apt-get download busybox-static:{debarch})"
        )
    return binary


def _applets(native_busybox: Path) -> list[str]:
    """Applet paths relative to ``/``, e.g. ``usr/bin/wc``, from the native busybox."""
    out = subprocess.run(
        [str(native_busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    applets = sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})
    if not applets:
        raise LayoutError(f"{native_busybox} --list-full listed no applets")
    return applets


def _tar_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _layer_tar(busybox: bytes, applets: list[str]) -> bytes:
    """The uncompressed root file system: busybox, its applet links, /tmp, /etc/passwd, group."""
    files: dict[str, tuple[bytes, int]] = {
        BUSYBOX: (busybox, 0o755),
        "etc/passwd": (PASSWD, 0o644),
        "etc/group": (GROUP, 0o644),
    }
    links = {path: "/" + BUSYBOX for path in applets if path != BUSYBOX}
    dirs: dict[str, int] = {"tmp": 0o1777}
    for path in [*files, *links]:
        parent = os.path.dirname(path)
        while parent:
            dirs.setdefault(parent, 0o755)
            parent = os.path.dirname(parent)

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for path, mode in dirs.items():
        entries.append((_tar_info(path, tarfile.DIRTYPE, mode), None))
    for path, (content, mode) in files.items():
        info = _tar_info(path, tarfile.REGTYPE, mode)
        info.size = len(content)
        entries.append((info, content))
    for path, target in links.items():
        info = _tar_info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        entries.append((info, None))
    # Sorting by path components puts every directory before what it holds.
    entries.sort(key=lambda entry: entry[0].name.split("/"))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buffer.getvalue()


def _image(blobs: _BlobStore, platform: DebPlatform, busybox: bytes, applets: list[str]) -> dict[str, object]:
    """Write one platform's layer, config and manifest; return the manifest's index entry."""
    tar = _layer_tar(busybox, applets)
    layer = blobs.put(MEDIA_LAYER, _gzip(tar))
    config: dict[str, object] = {
        "architecture": platform.architecture,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [ENV_PATH], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha256(tar)]},
        "history": [
            {
                "created": "1970-01-01T00:00:00Z",
                "created_by": f"{CREATED_BY}: busybox-static:{platform.debarch}",
            }
        ],
    }
    if platform.variant:
        config["variant"] = platform.variant
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": blobs.put(MEDIA_CONFIG, _canonical_json(config)),
        "layers": [layer],
    }
    entry = blobs.put(MEDIA_MANIFEST, _canonical_json(manifest))
    entry["platform"] = platform.descriptor()
    return entry


def build_layout(source: Path, out: Path, tag: str = "latest") -> str:
    """Write the layout to ``out`` (replacing it whole) and return the image index digest."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        scratch = Path(tmp) / "extract"
        staging = Path(tmp) / "layout"
        binaries = {p.debarch: _find_busybox(source, p.debarch, scratch) for p in PLATFORMS}
        applets = _applets(binaries[NATIVE])

        blobs = _BlobStore(staging)
        manifests = [_image(blobs, p, binaries[p.debarch].read_bytes(), applets) for p in PLATFORMS]
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        entry = blobs.put(MEDIA_INDEX, _canonical_json(index))
        entry["annotations"] = {REF_NAME_ANNOTATION: tag}
        (staging / "oci-layout").write_bytes(_canonical_json({"imageLayoutVersion": "1.0.0"}))
        (staging / "index.json").write_bytes(
            _canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]})
        )
        # Swap the finished layout in at once, so a half-written one is never left at ``out``.
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return str(entry["digest"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of busybox-static .deb files")
    parser.add_argument("out", type=Path, help="OCI image layout folder to (re)write")
    parser.add_argument("--tag", default="latest", help="ref.name of the image index")
    args = parser.parse_args(argv)
    try:
        digest = build_layout(args.source, args.out, args.tag)
    except (LayoutError, OSError, subprocess.CalledProcessError) as exc:
        print(f"busybox_layout: {exc}", file=sys.stderr)
        return 1
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
