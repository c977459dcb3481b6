"""Which Dockerfile features a Dockerfile uses, and which builders can run them.

    detect_features(Dockerfile text) ──► [FeatureUse: feature, line, what the line says]
                                                 │
    Builder(kind, version) of a node ────────────┴──► missing(builder, uses) ──► [Gap: why, what works]

Lab nodes run the builder their OS ships (buildah 1.28 / podman 4.3 on Debian 12), while
Dockerfiles are written for BuildKit's frontend. ``FEATURES`` is the table of which builder
versions run which feature; ``missing`` says, for one node, what it cannot run and what would.

Builders, as farm drives them:

* ``buildah`` and ``podman`` (podman builds with the buildah it bundles, ``PODMAN_BUILDAH``);
  buildah reads Dockerfiles with openshift/imagebuilder, which refuses flags it does not know;
* ``docker``: docker's classic builder (farm's agent runs ``docker build`` with
  ``DOCKER_BUILDKIT=0``), the same whatever the engine's version;
* ``buildkit``: BuildKit's Dockerfile frontend of the given version (``docker/dockerfile:X.Y``);
  a ``# syntax=docker/dockerfile:TAG`` directive makes BuildKit pull and run that frontend
  instead of its own, so it decides. No farm node runs BuildKit yet: the rows say what one would.

Rules of the table: a feature's row gives, per builder, the first version that runs it (None:
no version does). Versions are taken to only add features: a buildah newer than the newest row
(1.44) runs what 1.44 runs. Where the facts come from (``Support.evidence``):

* checked here: built on this machine, buildah 1.28.2 (``buildah --storage-driver vfs bud
  --isolation chroot --layers``, base ``localhost:5000/library/busybox``) and docker 20.10.24's
  classic builder, one Dockerfile per feature. buildah 1.28.2 ran: COPY --chmod, COPY --chown,
  COPY --from=IMAGE, RUN --mount type=bind (from=IMAGE, rw), type=cache (id, sharing, mode, uid,
  gid), type=tmpfs, type=secret (mode, uid, gid, required=true, target), type=ssh, and ignored
  ``# syntax=``. It refused: heredocs in RUN ("Unknown instruction: SET") and COPY, COPY --link,
  --parents, --exclude ("COPY only supports the --chmod… --chown… and the --from… flags"), ADD
  --checksum, --keep-git-dir, ADD git@… (taken as a path), RUN --network, RUN --security ("RUN
  only supports the --mount flag"), a tmpfs mount's size= ("size: invalid mount option"), a
  secret mount's env=, a cache mount from an image ("no stage found with name"), ${V#p} in ENV
  ("Missing ':' in substitution"), and panicked on a bare ``required`` in a secret mount. The
  classic builder ran COPY --chown, COPY --from=IMAGE and FROM --platform and ignored
  ``# syntax=``; it refused every other feature here ("the --mount option requires BuildKit",
  "the --chmod option requires BuildKit", "Unknown flag: link", "unknown instruction: SET", …).
* buildah's source and changelog: for versions after 1.28, read in containers/buildah at each
  release tag (the vendored imagebuilder's ``dispatchers.go`` flag lists, ``stage_executor.go``,
  ``internal/volumes``) and its CHANGELOG.md; podman's bundled buildah from podman's go.mod at
  each release tag.
* BuildKit: the "Minimum Dockerfile version" tables of its Dockerfile reference
  (frontend/dockerfile/docs/reference.md) and, where they say nothing, the frontend's source at
  the ``dockerfile/X.Y.0`` tags.

Pure: no I/O here. The node's builder and version come from its agent; the Dockerfile's text from
the build request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from farm.dockerfile import Instruction, mount_fields, parse_dockerfile

__all__ = [
    "FEATURES",
    "PODMAN_BUILDAH",
    "Builder",
    "FeatureUse",
    "Gap",
    "Support",
    "detect_features",
    "missing",
]

Version = tuple[int, ...]
BuilderKind = Literal["buildah", "podman", "docker", "buildkit"]

_CHECKED = "checked here"
_ANY: Version = (0,)


@dataclass(frozen=True)
class Support:
    """Which builders run a feature: the first version of each, None where none does."""

    title: str
    buildah: Version | None  # buildah, and podman through the buildah it bundles
    classic: bool  # docker's classic builder, any version
    buildkit: Version | None  # the Dockerfile frontend (docker/dockerfile:X.Y), stable channel
    labs: Version | None = None  # the frontend's labs channel (docker/dockerfile:X.Y-labs), if earlier
    entitlement: str = ""  # what BuildKit must be allowed for it (buildkitd and the build request)
    lowerable: bool = False  # farm could rewrite it exactly for a builder lacking it (issue 11, not yet)
    evidence: str = ""


FEATURES: dict[str, Support] = {
    "heredoc-run": Support(
        "a heredoc in RUN",
        buildah=(1, 33),
        classic=False,
        buildkit=(1, 4),
        lowerable=True,
        evidence=f"{_CHECKED} (buildah 1.28.2, docker classic); buildah CHANGELOG v1.33.0;"
        " BuildKit reference",
    ),
    "heredoc-copy": Support(
        "a heredoc in COPY or ADD",
        buildah=(1, 33),
        classic=False,
        buildkit=(1, 4),
        lowerable=True,
        evidence=f"{_CHECKED} (buildah 1.28.2, docker classic); buildah CHANGELOG v1.33.0;"
        " BuildKit reference",
    ),
    "copy-link": Support(
        "COPY --link / ADD --link",
        buildah=(1, 41),
        classic=False,
        buildkit=(1, 4),
        lowerable=True,
        evidence=f"{_CHECKED} (1.28.2 refuses the flag); buildah source: 1.37-1.40 refuse it"
        " ('COPY --link is not supported'), 1.41 takes it (with --layers, which farm passes);"
        " BuildKit reference",
    ),
    "copy-parents": Support(
        "COPY --parents",
        buildah=(1, 40),
        classic=False,
        buildkit=(1, 20),
        labs=(1, 7),
        evidence=f"{_CHECKED} (1.28.2 refuses); buildah CHANGELOG and source v1.40.0; BuildKit"
        " reference and source (parentsEnabled: labs-only before dockerfile/1.20.0)",
    ),
    "copy-exclude": Support(
        "COPY --exclude / ADD --exclude",
        buildah=(1, 38),
        classic=False,
        buildkit=(1, 19),
        labs=(1, 7),
        evidence=f"{_CHECKED} (1.28.2 refuses); buildah CHANGELOG and source v1.38.0 (1.37 parses"
        " and refuses it); BuildKit reference and source (labs-only before dockerfile/1.19.0)",
    ),
    "copy-chmod": Support(
        "COPY --chmod / ADD --chmod",
        buildah=(1, 20),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it; docker classic: 'the --chmod option requires"
        " BuildKit'); buildah CHANGELOG v1.20.0; BuildKit reference",
    ),
    "copy-chown": Support(
        "COPY --chown / ADD --chown",
        buildah=_ANY,
        classic=True,
        buildkit=_ANY,
        evidence=f"{_CHECKED} (buildah 1.28.2 and docker classic run it); BuildKit reference",
    ),
    "add-checksum": Support(
        "ADD --checksum",
        buildah=(1, 33),
        classic=False,
        buildkit=(1, 6),
        evidence=f"{_CHECKED} (1.28.2 refuses); buildah CHANGELOG and vendored imagebuilder v1.33.0;"
        " BuildKit reference (HTTP sources; Git commit checksums came later)",
    ),
    "add-git": Support(
        "ADD from a Git repository",
        buildah=(1, 38),
        classic=False,
        buildkit=(1, 5),
        evidence=f"{_CHECKED} (buildah 1.28.2 and docker classic take git@… for a path in the"
        " context); buildah CHANGELOG v1.38.0 'add support for git source'; BuildKit source"
        " (gitutil in ADD from dockerfile/1.5.0)",
    ),
    "add-keep-git-dir": Support(
        "ADD --keep-git-dir",
        buildah=None,
        classic=False,
        buildkit=(1, 5),
        evidence=f"{_CHECKED} (1.28.2 refuses the flag); buildah source to 1.44: 'ADD --keep-git-dir"
        " is not supported'; BuildKit source (Git sources in ADD from dockerfile/1.5.0)",
    ),
    "add-unpack": Support(
        "ADD --unpack",
        buildah=None,
        classic=False,
        buildkit=(1, 17),
        evidence="buildah source to 1.44 (imagebuilder's ADD flags lack it); BuildKit reference",
    ),
    "run-network": Support(
        "RUN --network (none or default)",
        buildah=(1, 30),
        classic=False,
        buildkit=(1, 3),
        evidence=f"{_CHECKED} (1.28.2: 'RUN only supports the --mount flag'); buildah CHANGELOG and"
        " vendored imagebuilder v1.30.0; BuildKit reference",
    ),
    "run-network-host": Support(
        "RUN --network=host",
        buildah=(1, 30),
        classic=False,
        buildkit=(1, 3),
        entitlement="network.host",
        evidence=f"{_CHECKED} (1.28.2 refuses --network); buildah v1.30.0; BuildKit reference (needs"
        " the network.host entitlement). It bypasses a build's --network: farm's policy must allow it",
    ),
    "run-security": Support(
        "RUN --security",
        buildah=None,
        classic=False,
        buildkit=(1, 20),
        entitlement="security.insecure",
        evidence=f"{_CHECKED} (1.28.2 refuses); buildah source to 1.44: imagebuilder's RUN takes"
        " --mount and --network only; BuildKit reference (insecure needs the entitlement)",
    ),
    "run-device": Support(
        "RUN --device",
        buildah=None,
        classic=False,
        buildkit=None,
        labs=(1, 14),
        entitlement="device",
        evidence="buildah source to 1.44 (imagebuilder's RUN flags); BuildKit reference (labs only)",
    ),
    "mount-bind": Support(
        "RUN --mount=type=bind",
        buildah=(1, 24),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it, from= an image and rw too; docker classic:"
        " 'the --mount option requires BuildKit'); buildah CHANGELOG v1.24.0; BuildKit reference",
    ),
    "mount-cache": Support(
        "RUN --mount=type=cache",
        buildah=(1, 24),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it with id, sharing=locked, mode, uid, gid);"
        " buildah CHANGELOG v1.24.0; BuildKit reference",
    ),
    "mount-tmpfs": Support(
        "RUN --mount=type=tmpfs",
        buildah=(1, 24),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it); buildah CHANGELOG v1.24.0; BuildKit reference",
    ),
    "mount-secret": Support(
        "RUN --mount=type=secret",
        buildah=(1, 21),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it with id, target, required=true, mode, uid, gid);"
        " buildah source v1.21.0; BuildKit reference",
    ),
    "mount-ssh": Support(
        "RUN --mount=type=ssh",
        buildah=(1, 23),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (buildah 1.28.2 runs it); buildah CHANGELOG and source v1.23.0;"
        " BuildKit reference",
    ),
    "mount-cache-from-image": Support(
        "a cache mount from= an image (not a stage)",
        buildah=(1, 39),
        classic=False,
        buildkit=(1, 2),
        evidence=f"{_CHECKED} (1.28.2: 'no stage found with name'); buildah source: v1.39.0 looks"
        " images up for cache mounts; BuildKit reference",
    ),
    "mount-tmpfs-size": Support(
        "a tmpfs mount's size=",
        buildah=None,
        classic=False,
        buildkit=(1, 4),
        evidence=f"{_CHECKED} (1.28.2: 'size: invalid mount option'); buildah source to 1.44 knows"
        " tmpfs-size= only; BuildKit source dockerfile/1.4.0",
    ),
    "mount-secret-env": Support(
        "a secret mount's env=",
        buildah=(1, 44),
        classic=False,
        buildkit=(1, 10),
        evidence=f"{_CHECKED} (1.28.2 refuses it); buildah CHANGELOG v1.44.0; BuildKit reference",
    ),
    "mount-required-bare": Support(
        "'required' without a value in a secret or ssh mount",
        buildah=(1, 31),
        classic=False,
        buildkit=(1, 4),
        evidence=f"{_CHECKED} (buildah 1.28.2 panics on it); buildah CHANGELOG v1.31.0 'accept"
        " required flag w/o value'; BuildKit source dockerfile/1.4.0",
    ),
    "expansion-patterns": Support(
        "${VAR#…}, ${VAR%…} or ${VAR/…/…} in an instruction the builder expands",
        buildah=(1, 37),
        classic=False,
        buildkit=(1, 7),
        evidence=f"{_CHECKED} (buildah 1.28.2 and docker classic: 'missing ':' in substitution');"
        " buildah's vendored imagebuilder v1.37.0; BuildKit source dockerfile/1.7.0",
    ),
    "syntax": Support(
        "a '# syntax=' frontend",
        buildah=_ANY,
        classic=True,
        buildkit=_ANY,
        evidence=f"{_CHECKED} (buildah 1.28.2 and docker classic ignore it); BuildKit runs the"
        " frontend it names (farm refuses any but docker/dockerfile)",
    ),
}

# The buildah each podman release builds with: podman's go.mod at each vX.Y.0 tag.
PODMAN_BUILDAH: dict[Version, Version] = {
    (3, 0): (1, 19),
    (3, 1): (1, 20),
    (3, 2): (1, 21),
    (3, 3): (1, 22),
    (3, 4): (1, 23),
    (4, 0): (1, 24),
    (4, 1): (1, 26),
    (4, 2): (1, 27),
    (4, 3): (1, 28),
    (4, 4): (1, 29),
    (4, 5): (1, 30),
    (4, 6): (1, 31),
    (4, 7): (1, 32),
    (4, 8): (1, 33),
    (4, 9): (1, 33),
    (5, 0): (1, 35),
    (5, 1): (1, 36),
    (5, 2): (1, 37),
    (5, 3): (1, 38),
    (5, 4): (1, 39),
    (5, 5): (1, 40),
    (5, 6): (1, 41),
    (5, 7): (1, 42),
    (5, 8): (1, 43),
}

_NEWEST: Version = (99, 99)  # a frontend tag naming a channel (1, latest, labs): its newest release
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_GIT_SOURCE = re.compile(
    r"^(?:github\.com/|git://|ssh://|[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+:(?!//)|https?://[^#?]*\.git(?:[#?]|$))"
)
_PATTERN_EXPANSION = re.compile(r"(?<!\\)\$\{[A-Za-z_][A-Za-z0-9_]*(?:#|%|/)")
# The instructions whose arguments the builder expands (BuildKit's "Environment replacement").
_EXPANDED = frozenset(
    ("ADD", "COPY", "ENV", "EXPOSE", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR", "ARG")
)


@dataclass(frozen=True, order=True)
class FeatureUse:
    line: int
    feature: str  # a key of FEATURES
    text: str  # what on that line uses it, e.g. "--mount=type=cache,target=/root/.cache"

    @property
    def title(self) -> str:
        return FEATURES[self.feature].title


@dataclass(frozen=True)
class Builder:
    """A node's builder: ``kind`` as farm drives it, and the version its agent reports (for
    ``buildkit``, the Dockerfile frontend version it runs by itself)."""

    kind: BuilderKind
    version: str

    def __str__(self) -> str:
        if self.kind == "docker":
            return f"docker {self.version} (its classic builder)"
        if self.kind == "buildkit":
            return f"BuildKit (docker/dockerfile:{self.version})"
        return f"{self.kind} {self.version}"

    @property
    def buildah(self) -> Version:
        """The buildah that builds: buildah's own version, or the one podman bundles."""
        version = _parse_version(self.version)
        if self.kind == "buildah":
            return version
        known = [podman for podman in PODMAN_BUILDAH if podman <= version[:2]]
        return PODMAN_BUILDAH[max(known)] if known else (1, 0)


@dataclass(frozen=True)
class Gap:
    """A feature a builder cannot run, and what would run it."""

    use: FeatureUse
    builder: Builder
    remedy: str

    @property
    def message(self) -> str:
        return f"line {self.use.line}: {self.use.title} ({self.use.text}): {self.builder} cannot run it"


def detect_features(dockerfile: str, *, name: str = "Dockerfile") -> list[FeatureUse]:
    """Every feature ``dockerfile`` uses that not every builder runs, with its line, in order.

    ONBUILD instructions are left out: their triggers run in the builds of later images. FROM
    and the ARGs before it are too: farm expands and pins them itself."""
    parsed = parse_dockerfile(dockerfile, name=name)
    uses: list[FeatureUse] = []
    if parsed.syntax:
        uses.append(FeatureUse(parsed.syntax_line, "syntax", parsed.syntax))
    stage_names = {
        instruction.arguments[2].lower()
        for instruction in parsed.instructions
        if instruction.keyword == "FROM" and len(instruction.arguments) == 3
    }
    in_stage = False
    for instruction in parsed.instructions:
        if instruction.keyword == "FROM":
            in_stage = True
            continue
        if not in_stage or instruction.keyword == "ONBUILD":
            continue
        if instruction.keyword == "RUN":
            uses += _run_features(instruction, stage_names)
        elif instruction.keyword in ("COPY", "ADD"):
            uses += _copy_features(instruction)
        if instruction.keyword in _EXPANDED and not instruction.heredocs:
            for argument in instruction.arguments:
                match = _PATTERN_EXPANSION.search(argument)
                if match:
                    uses.append(FeatureUse(instruction.line, "expansion-patterns", argument))
                    break
    return sorted(uses)


def _run_features(instruction: Instruction, stage_names: set[str]) -> list[FeatureUse]:
    line = instruction.line
    uses = []
    if instruction.heredocs:
        uses.append(FeatureUse(line, "heredoc-run", f"<<{instruction.heredocs[0].name}"))
    for value in instruction.flag_values("network"):
        feature = "run-network-host" if value == "host" else "run-network"
        uses.append(FeatureUse(line, feature, f"--network={value}"))
    for value in instruction.flag_values("security"):
        uses.append(FeatureUse(line, "run-security", f"--security={value}"))
    for value in instruction.flag_values("device"):
        uses.append(FeatureUse(line, "run-device", f"--device={value}"))
    for value in instruction.flag_values("mount"):
        text = f"--mount={value}"
        try:
            fields = mount_fields(value or "")
        except ValueError:
            continue  # refused when the stages are read (farm.dockerfile)
        options = dict(fields)
        kind = (options.get("type") or "bind").lower()
        if f"mount-{kind}" in FEATURES:
            uses.append(FeatureUse(line, f"mount-{kind}", text))
        source = options.get("from")
        if kind == "cache" and source and source.lower() not in stage_names and source != "scratch":
            uses.append(FeatureUse(line, "mount-cache-from-image", text))
        if kind == "tmpfs" and "size" in options:
            uses.append(FeatureUse(line, "mount-tmpfs-size", text))
        if kind == "secret" and "env" in options:
            uses.append(FeatureUse(line, "mount-secret-env", text))
        if kind in ("secret", "ssh") and ("required", None) in fields:
            uses.append(FeatureUse(line, "mount-required-bare", text))
    return uses


def _copy_features(instruction: Instruction) -> list[FeatureUse]:
    line = instruction.line
    keyword = instruction.keyword
    uses = []
    if instruction.heredocs:
        uses.append(FeatureUse(line, "heredoc-copy", f"{keyword} <<{instruction.heredocs[0].name}"))
    flags = {
        "link": "copy-link",
        "parents": "copy-parents",
        "exclude": "copy-exclude",
        "chmod": "copy-chmod",
        "chown": "copy-chown",
        "checksum": "add-checksum",
        "keep-git-dir": "add-keep-git-dir",
        "unpack": "add-unpack",
    }
    for flag, feature in flags.items():
        for value in instruction.flag_values(flag):
            if value in ("false", "False", "0"):
                continue  # --link=false and the like ask for nothing
            uses.append(FeatureUse(line, feature, f"{keyword} --{flag}" + (f"={value}" if value else "")))
    if keyword == "ADD" and not instruction.json:
        for source in instruction.arguments[:-1]:
            if _GIT_SOURCE.match(source):
                uses.append(FeatureUse(line, "add-git", f"ADD {source}"))
    return uses


def missing(builder: Builder, uses: Iterable[FeatureUse]) -> list[Gap]:
    """The uses ``builder`` cannot run, each with what would run it. For BuildKit, the frontend
    a ``# syntax=docker/dockerfile:TAG`` use names is the one that runs (it is pulled)."""
    uses = list(uses)
    frontend, labs = _frontend(builder, uses)
    pinned = [use.text for use in uses if use.feature == "syntax"]
    runner = builder
    if builder.kind == "buildkit" and pinned:
        # The directive's frontend is the one that runs, whatever the node's BuildKit bundles.
        runner = Builder("buildkit", pinned[0].split("@", 1)[0].partition(":")[2] or "latest")
    gaps = []
    for use in uses:
        support = FEATURES[use.feature]
        if builder.kind == "docker":
            runs = support.classic
        elif builder.kind == "buildkit":
            runs = _at_least(frontend, support.buildkit) or (labs and _at_least(frontend, support.labs))
        elif builder.kind in ("buildah", "podman"):
            runs = _at_least(builder.buildah, support.buildah)
        else:
            raise ValueError(f"unknown builder kind {builder.kind!r}")
        if not runs:
            remedy = _remedy(support)
            if runner is not builder:
                remedy += f"; the Dockerfile's '# syntax={pinned[0]}' chooses the frontend BuildKit runs"
            gaps.append(Gap(use, runner, remedy))
    return gaps


def _frontend(builder: Builder, uses: list[FeatureUse]) -> tuple[Version, bool]:
    """The frontend version a BuildKit builder runs, and whether it is a labs one."""
    tag = builder.version
    for use in uses:
        if use.feature == "syntax":
            _, _, tag = use.text.split("@", 1)[0].partition(":")
            tag = tag or "latest"
    labs = tag.endswith("labs")
    channel = tag.removesuffix("-labs").removesuffix("labs")
    match = _VERSION.fullmatch(channel)
    if not match:
        return _NEWEST, labs  # latest, labs, master, …: the newest frontend
    parts = [int(part) for part in match.groups() if part is not None]
    if len(parts) == 1:
        return (parts[0], _NEWEST[1]), labs  # "1": the newest 1.x
    return tuple(parts), labs


def _remedy(support: Support) -> str:
    """Where a feature runs, for a message: "runs on buildah 1.33 or newer (podman 4.8 or …"."""
    places = []
    if support.buildah is not None:
        podman = min((p for p, b in PODMAN_BUILDAH.items() if b >= support.buildah), default=None)
        podman_text = f"podman {_spelled(podman)} or newer" if podman else "no podman release yet"
        places.append(f"buildah {_spelled(support.buildah)} or newer ({podman_text})")
    if support.buildkit is not None:
        places.append(f"BuildKit with docker/dockerfile:{_spelled(support.buildkit)} or newer")
    elif support.labs is not None:
        places.append(f"BuildKit with docker/dockerfile:{_spelled(support.labs)}-labs or newer")
    if support.classic:
        places.append("docker's classic builder")
    if not places:
        return "no builder farm knows runs it"
    text = "runs on " + "; ".join(places)
    if support.entitlement:
        text += f" (BuildKit must be allowed {support.entitlement})"
    return text


def _at_least(version: Version, first: Version | None) -> bool:
    return first is not None and version >= first


def _parse_version(text: str) -> Version:
    match = _VERSION.search(text)
    if not match:
        raise ValueError(f"no version in {text!r}")
    return tuple(int(part) for part in match.groups() if part is not None)


def _spelled(version: Version | None) -> str:
    return ".".join(str(part) for part in version) if version else "any"
