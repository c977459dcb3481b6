"""The parts of a Dockerfile farm must understand: its stages' bases, and how to pin them.

Every node builds from the same snapshot of each base image, pinned by digest for the platform
each stage runs as. That also closes a real hole: buildah 1.28 reuses a base image already pulled
for another platform under the same name, silently putting amd64 binaries into an "s390x" image.
A base named by its per-platform digest can only be that image.

Pure: no I/O here. The orchestration resolves the ``BaseImage``s and hands back their digests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from farm.errors import ContextError, PlatformError
from farm.platforms import Platform, parse_platform
from farm.registry.name import Reference, parse_reference

__all__ = ["BaseImage", "Stage", "parse_stages", "pin_bases"]

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(.+?)\s*$")
_WHITESPACE = re.compile(r"[ \t\v\f\r]+")  # what separates an instruction from its arguments
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class BaseImage:
    """A registry image a stage starts from, for the platform the stage runs as."""

    reference: Reference
    platform: Platform


@dataclass(frozen=True)
class Stage:
    line: int  # index of the FROM instruction's first physical line
    last_line: int  # index of its last physical line (continuations)
    name: str  # "AS name", lowercased, or ""
    platform_flag: str  # the expanded --platform value, or ""
    source: str  # the image as written, after ARG expansion
    base: BaseImage | None  # None for scratch and for earlier stages


def parse_stages(
    dockerfile: str,
    *,
    target: Platform,
    build: Platform,
    build_args: dict[str, str],
) -> list[Stage]:
    """Find each stage's base, with global ARGs and BuildKit's platform ARGs expanded."""
    escape = "\\"
    lines = _split_lines(dockerfile.removeprefix("\ufeff"))  # BuildKit drops a UTF-8 BOM
    for line in lines:
        match = _DIRECTIVE.match(line)
        if not match:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2)
    variables = {**target.build_args("TARGET"), **build.build_args("BUILD")}
    stages: list[Stage] = []
    for first, last, text in _instructions(lines, escape):
        keyword, _, rest = _WHITESPACE.sub(" ", text.strip(), count=1).partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            for declaration in rest.split():
                name, has_default, default = declaration.partition("=")
                if name in build_args:
                    variables[name] = build_args[name]
                elif has_default:
                    variables[name] = _expand(_unquote(default), variables)
        elif keyword == "FROM":
            stages.append(_parse_from(first, last, rest, variables, stages, target))
    if not stages:
        raise ContextError("the Dockerfile has no FROM instruction")
    return stages


def pin_bases(dockerfile: str, stages: list[Stage], digests: dict[BaseImage, str]) -> str:
    """The Dockerfile with each registry base replaced by its per-platform digest."""
    lines = _split_lines(dockerfile)
    for stage in reversed(stages):
        if stage.base is None:
            continue
        pinned = stage.base.reference.with_digest(digests[stage.base])
        parts = ["FROM"]
        if stage.platform_flag:
            parts.append(f"--platform={stage.platform_flag}")
        parts.append(str(pinned))
        if stage.name:
            parts += ["AS", stage.name]
        lines[stage.line : stage.last_line + 1] = [" ".join(parts)]
    return "\n".join(lines)


def _parse_from(
    first: int,
    last: int,
    rest: str,
    variables: dict[str, str],
    earlier: list[Stage],
    target: Platform,
) -> Stage:
    words = rest.split()
    platform_flag = ""
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--platform="):
            platform_flag = _expand(flag.split("=", 1)[1], variables)
        else:
            raise ContextError(f"Dockerfile line {first + 1}: unknown FROM flag {flag!r}")
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
        raise ContextError(
            f"Dockerfile line {first + 1}: expected 'FROM [--platform=P] IMAGE [AS NAME]'",
        )
    source = _expand(words[0], variables)
    name = words[2].lower() if len(words) == 3 else ""
    stage_names = {stage.name for stage in earlier if stage.name}
    if source.lower() == "scratch" or source.lower() in stage_names:
        return Stage(first, last, name, platform_flag, source, None)
    platform = target
    if platform_flag:
        try:
            platform = parse_platform(platform_flag)
        except PlatformError as exc:
            raise ContextError(f"Dockerfile line {first + 1}: {exc.message}", hint=exc.hint) from exc
    reference = parse_reference(source)
    return Stage(first, last, name, platform_flag, source, BaseImage(reference, platform))


def _instructions(lines: list[str], escape: str) -> list[tuple[int, int, str]]:
    """Logical instructions as (first line, last line, text), continuations joined."""
    found = []
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        if not stripped or stripped.startswith("#"):
            index += 1
            continue
        first = index
        parts = []
        while True:
            text = lines[index].rstrip()
            continued = text.endswith(escape)
            parts.append(text[: -len(escape)] if continued else text)
            if not continued or index + 1 >= len(lines):
                break
            index += 1
            # Comment and empty lines inside a continued instruction are dropped, as docker does.
            while index < len(lines) - 1 and (
                not lines[index].strip() or lines[index].strip().startswith("#")
            ):
                index += 1
        found.append((first, index, " ".join(part.strip() for part in parts)))
        index += 1
    return found


def _split_lines(dockerfile: str) -> list[str]:
    """Physical lines as BuildKit reads them: split at "\n" only (a "\r" before it is whitespace).

    ``str.splitlines`` would also split at form feeds, U+2028 and the like, which are ordinary
    characters inside a Dockerfile's instructions.
    """
    return dockerfile.split("\n")


def _expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME``, ``${NAME}``, ``${NAME:-default}`` and ``${NAME:+alternative}``, as docker expands."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, word, bare = match.groups()
        value = variables.get(name or bare, "")
        if operator == "-":
            return value or word
        if operator == "+":
            return word if value else ""
        return value

    return _VARIABLE.sub(substitute, text)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value
