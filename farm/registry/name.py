"""Image references, parsed the way docker parses them (``distribution/reference``).

``localhost:5000/team/app:1.2`` is registry ``localhost:5000``, repository ``team/app``, tag ``1.2``.
The first path part is a registry only if it is ``localhost``, or has a ``.`` or a ``:``; otherwise
the reference is on Docker Hub and single names get ``library/``.

Pure: no I/O here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from farm.errors import ReferenceError_

__all__ = ["DOCKER_HUB", "Reference", "is_loopback_host", "parse_reference"]

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_LEGACY_DOCKER_HUB = "index.docker.io"  # docker rewrites it to docker.io
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """Registry and repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host serving the registry API (Docker Hub's differs from its name)."""
        return _DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest if any, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, "", digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, "")


def parse_reference(text: str, *, default_tag: str = "latest") -> Reference:
    """Parse an image reference; a reference with neither tag nor digest gets ``default_tag``."""
    original = text
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise ReferenceError_(f"invalid image reference {original!r}: empty or contains spaces")
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise ReferenceError_(
                f"invalid digest in {original!r}",
                hint="a digest is sha256: and 64 lowercase hex digits",
            )
    registry, _, remainder = text.partition("/")
    if remainder and (registry == "localhost" or "." in registry or ":" in registry):
        if not _HOST.match(registry):
            raise ReferenceError_(f"invalid registry host {registry!r} in {original!r}")
    else:
        registry, remainder = DOCKER_HUB, text
    if registry == _LEGACY_DOCKER_HUB:
        registry = DOCKER_HUB
    tag = ""
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        remainder, tag = remainder.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ReferenceError_(
                f"invalid tag {tag!r} in {original!r}",
                hint="a tag is up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
            )
    if registry == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    if not _REPOSITORY.match(remainder):
        raise ReferenceError_(
            f"invalid repository name {remainder!r} in {original!r}",
            hint="repository names are lowercase letters, digits and separators ('.', '_', '__', '-', '/')",
        )
    if len(f"{registry}/{remainder}") > 255:
        raise ReferenceError_(f"image name too long in {original!r} (255 characters at most)")
    if not tag and not digest:
        tag = default_tag
    return Reference(registry, remainder, tag, digest)


def is_loopback_host(registry: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ::1, with or without a port: plain HTTP, as docker does."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
