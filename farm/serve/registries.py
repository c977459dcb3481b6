"""Which registries ``farm serve`` may contact, and the check of a submitted build against them.

A build makes the server contact the registry of each of its tags (to push, to verify what was
pushed) and of each image its Dockerfile names (FROM, COPY --from, RUN --mount from: to pin it),
and tells its nodes which hosts speak plain HTTP (``insecure_registries``). Each of those must be
a registry the server's operator allowed: otherwise any client with the token could make the
server open connections to any host and port it can reach, its own loopback services included.

    allowed = --allow-registry HOST[:PORT] ...       given: exactly those
            | docker.io + the registries the server's docker config names (auths, credHelpers)

Names are compared as docker writes them: ``host[:port]``, host in lower case, Docker Hub's
aliases as ``docker.io``. A host without a port allows that host on its default port only.

Pure: the docker config's document is read by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from farm.dockerfile import image_references
from farm.errors import FarmError, InputError
from farm.platforms import Platform
from farm.registry.name import DOCKER_HUB, parse_reference

__all__ = ["RegistryPolicy", "normalize_registry", "registries_in_docker_config"]

_DOCKER_HUB_ALIASES = frozenset((DOCKER_HUB, "index.docker.io", "registry-1.docker.io"))
# Where a Dockerfile's bases can depend on the platform a node builds on (BuildKit's BUILD* args).
_BUILD_ARGS = ("BUILDPLATFORM", "BUILDOS", "BUILDARCH", "BUILDVARIANT")


def normalize_registry(text: str) -> str:
    """``HOST[:PORT]`` as references name it; ``ValueError`` if it is not one."""
    value = text.strip().lower()
    if value in _DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    try:
        registry = parse_reference(f"{value}/probe").registry
    except FarmError:
        registry = ""
    if registry != value:
        raise ValueError(f"{text!r} is not a registry: write HOST[:PORT], e.g. registry.lab:5000")
    return registry


def registries_in_docker_config(document: Mapping[str, Any]) -> set[str]:
    """The registries a docker ``config.json`` holds credentials for."""
    found: set[str] = set()
    for section in ("auths", "credHelpers"):
        keys = document.get(section)
        if not isinstance(keys, dict):
            continue
        for key in keys:
            host = str(key).removeprefix("https://").removeprefix("http://").split("/", 1)[0]
            try:
                found.add(normalize_registry(host))
            except ValueError:
                continue
    return found


@dataclass(frozen=True)
class RegistryPolicy:
    allowed: frozenset[str]

    @classmethod
    def default(cls, docker_config: Mapping[str, Any]) -> RegistryPolicy:
        return cls(frozenset({DOCKER_HUB, *registries_in_docker_config(docker_config)}))

    def check_options(self, tags: Iterable[str], insecure_registries: Iterable[str]) -> None:
        """Refuse tags and plain-HTTP hosts that name a registry this server may not contact."""
        for tag in tags:
            self._check(parse_reference(tag).registry, f"tag {tag}")
        for host in insecure_registries:
            try:
                registry = normalize_registry(host)
            except ValueError as exc:
                raise InputError(f"insecure registry {host!r}: {exc}") from None
            self._check(registry, f"insecure registry {host}")

    def check_dockerfile(
        self,
        dockerfile: str,
        build_args: dict[str, str],
        targets: Iterable[Platform],
        builds: Iterable[Platform],
    ) -> None:
        """Refuse a Dockerfile naming an image (FROM, ``COPY --from``, ``RUN --mount=…,from=``) in a
        registry this server may not contact.

        Images are found as the build will find them to pin them: for each target platform, and,
        where the Dockerfile uses BuildKit's BUILD* arguments, for each platform a node may build on.
        """
        others = list(builds) if any(name in dockerfile for name in _BUILD_ARGS) else []
        for target in targets:
            for build in [target, *(other for other in others if other != target)]:
                try:
                    uses = image_references(dockerfile, target=target, build=build, build_args=build_args)
                except FarmError:
                    if build == target:
                        raise  # the build cannot start: say so now
                    continue  # only a node of that platform would find out, and contact nothing
                for use in uses:
                    self._check(use.image.reference.registry, use.description)

    def _check(self, registry: str, named_by: str) -> None:
        if registry.lower() in self.allowed:
            return
        raise InputError(
            f"this farm server may not contact registry {registry} ({named_by}): its operator can"
            f" allow it with farm serve --allow-registry {registry}",
            hint=f"registries it may contact: {', '.join(sorted(self.allowed)) or 'none'}",
        )
