"""Dockerfiles as BuildKit reads them, and every image a build pulls, pinned per platform.

Reading is BuildKit's own parser (``moby/buildkit`` ``frontend/dockerfile/parser`` v0.12.5, through
the ``dockerfile`` package): directives, continuations, comments, heredocs, JSON forms. What that
parser leaves to BuildKit's dispatcher, and farm needs before anything reaches a node, is here,
following ``dockerfile2llb`` and ``shell/lex.go``:

* the ARGs before the first FROM, expanded by the rules of BuildKit's shell lexer (quotes, the
  escape token, ``${V:-w}`` ``${V-w}`` ``${V:+w}`` ``${V+w}`` ``${V:?m}`` ``${V?m}``, and the
  dockerfile:1.7 forms ``${V#p}`` ``${V%p}`` ``${V/p/r}``), with ``--build-arg`` values and the
  automatic platform ARGs;
* stages: names (lower-cased), ``--platform``, and bases that are an earlier stage or ``scratch``;
* every image a build pulls (``ImageUse``): ``FROM``, ``COPY --from=`` and ``RUN --mount=…,from=``
  naming no stage, each for the platform BuildKit resolves it for (a FROM for its stage's
  platform; the other two for the target platform, as ``dockerfile2llb`` does);
* pinning: each of those rewritten to its per-platform digest, so every node builds from the same
  snapshot and no builder can take a same-named image pulled for another platform (buildah 1.28
  reuses one silently, putting amd64 binaries into an "s390x" image).

Named build contexts (``--build-context NAME=VALUE``) are not taken by farm yet: ``contexts`` of
``image_references`` is the seam where they plug in (see ``_ContextImages``).

Pure: no I/O here. The orchestration resolves the ``BaseImage``s and hands back their digests.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import dockerfile as _buildkit

from farm.errors import ContextError, FarmError, PlatformError
from farm.platforms import Platform, parse_platform
from farm.registry.name import Reference, parse_reference

__all__ = [
    "BaseImage",
    "Dockerfile",
    "Heredoc",
    "ImageUse",
    "Instruction",
    "Stage",
    "image_references",
    "image_registries",
    "mount_fields",
    "parse_dockerfile",
    "parse_stages",
    "pin_bases",
    "pin_images",
]

# The frontends a "# syntax=" directive may name: Docker's Dockerfile frontend, released or
# upstream, by channel or version tag, with or without a digest. Anything else is a frontend of
# another language, which no builder farm drives would read as its author meant.
_FRONTEND = re.compile(
    r"^(?:docker\.io/)?docker/dockerfile(?:-upstream)?"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$"
)
# BuildKit's directive parser (parser/directives.go): Go's \s is [\t\n\f\r ].
_DIRECTIVE = re.compile(r"^#[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*$")
_SYNTAX_DIRECTIVE = re.compile(
    r"^//[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*$"
)
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9-_.]*$")
_INDEX = re.compile(r"^[+-]?[0-9]+$")  # what Go's strconv.Atoi takes: a COPY --from stage index
_KNOWN = frozenset(_buildkit.all_cmds())
_HEREDOC_WORD = re.compile(r"<<(-?)[ \t]*([\"']?)([^\s\"'<>]+)\2")  # <<EOF, <<-"EOF", 3<<'EOF'…
# Bytes parsed at most to find the line of an error the parser reports without one (about 4 s).
_LOCATE_BUDGET = 8 * 1024 * 1024


@dataclass(frozen=True)
class Heredoc:
    name: str  # the delimiter, unquoted
    content: str  # the body as written (a ``<<-`` body keeps its tabs: the builder strips them)
    fd: int  # the file descriptor of ``3<<EOF``, 0 when none is given


@dataclass(frozen=True)
class Instruction:
    """One instruction as BuildKit's parser read it. Lines count from 1, as builders print them."""

    keyword: str  # upper case (for ONBUILD, "ONBUILD")
    line: int  # its first physical line
    last_line: int  # its last physical line: continuations and heredoc bodies included
    flags: tuple[str, ...]  # "--name=value" after the parser's quote removal ("--link" bare)
    arguments: tuple[str, ...]
    json: bool  # the exec (JSON array) form
    heredocs: tuple[Heredoc, ...]
    original: str  # the instruction with continuations joined
    trigger: str = ""  # ONBUILD's instruction, upper case (its flags are not given by the parser)

    def flag_values(self, name: str) -> list[str | None]:
        """The values of every ``--name=VALUE`` flag, in order (None for a bare ``--name``)."""
        found: list[str | None] = []
        for flag in self.flags:
            key, has_value, value = flag[2:].partition("=")
            if key == name:  # BuildKit's flags are case-sensitive
                found.append(value if has_value else None)
        return found


@dataclass(frozen=True)
class Dockerfile:
    name: str  # how errors name the file
    text: str
    escape: str  # the escape token: "\\" or "`"
    syntax: str  # the frontend a "# syntax=" directive names, or ""
    syntax_line: int  # its line, 0 when there is none
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class BaseImage:
    """A registry image a build pulls, for the platform it is pulled for."""

    reference: Reference
    platform: Platform


@dataclass(frozen=True)
class Stage:
    line: int  # the FROM instruction's first physical line (from 1)
    last_line: int  # its last physical line (continuations)
    name: str  # "AS name", lowercased, or ""
    platform_flag: str  # the expanded --platform value, or ""
    source: str  # the image as written, after ARG expansion
    base: BaseImage | None  # None for scratch, earlier stages and named contexts that are no image


ImageKind = Literal["from", "copy", "mount", "context"]


@dataclass(frozen=True)
class ImageUse:
    """An image the build pulls, where the Dockerfile names it, and the platform it is pulled for.

    ``kind`` is "from" (a stage's base), "copy" (``COPY --from=IMAGE``), "mount"
    (``RUN --mount=…,from=IMAGE``), or "context" (a named build context whose value is an image:
    pin the context's value, not a line of the Dockerfile).
    """

    kind: ImageKind
    line: int
    last_line: int
    written: str  # the image as the instruction names it (a FROM after ARG expansion)
    image: BaseImage
    stage: Stage  # the stage it is used in (for "from", the stage it starts)
    context: str = ""  # for "context": the context's name

    @property
    def description(self) -> str:
        """How a message names the use: ``line 7: COPY --from=alpine:3.20``."""
        spelled = {
            "from": f"FROM {self.written}",
            "copy": f"COPY --from={self.written}",
            "mount": f"RUN --mount=from={self.written}",
            "context": f"build context {self.context}={self.written}",
        }[self.kind]
        return f"line {self.line}: {spelled}"


def parse_dockerfile(text: str, *, name: str = "Dockerfile") -> Dockerfile:
    """Read ``text`` with BuildKit's parser; ``ContextError`` with the file, the line and the
    reason for a Dockerfile BuildKit would refuse before building."""
    return _parse(text, name)


@functools.lru_cache(maxsize=8)  # farm serve checks one text for many platforms
def _parse(text: str, name: str) -> Dockerfile:
    if "\0" in text:
        # The binding hands the text to Go as a C string: everything after a NUL would vanish.
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ContextError(f"{name} line {line}: a NUL character; a Dockerfile is text")
    try:
        commands = _buildkit.parse_string(text)
    except _buildkit.GoParseError as exc:
        raise _parse_error(text, name, str(exc)) from None
    escape, syntax, syntax_line = _directives(text, name)
    instructions = []
    for command in commands:
        if command.cmd is None:
            continue  # a line holding only the escape token: BuildKit ignores it too
        instruction = Instruction(
            keyword=str(command.cmd).upper(),
            line=int(command.start_line),
            last_line=int(command.end_line),
            flags=tuple(str(flag) for flag in command.flags),
            arguments=tuple(str(value) for value in command.value),
            json=bool(command.json),
            heredocs=tuple(
                Heredoc(str(doc.name), str(doc.content), int(doc.file_descriptor)) for doc in command.heredocs
            ),
            original=str(command.original),
            trigger=str(command.sub_cmd or "").upper(),
        )
        _check_instruction(instruction, name)
        instructions.append(instruction)
    return Dockerfile(name, text, escape, syntax, syntax_line, tuple(instructions))


def _check_instruction(instruction: Instruction, name: str) -> None:
    """What BuildKit's instruction parser refuses of an instruction the syntax parser accepted."""
    where = f"{name} line {instruction.line}"
    keyword = instruction.keyword
    if keyword.lower() not in _KNOWN:
        close = difflib.get_close_matches(keyword.lower(), sorted(_KNOWN), n=1)
        raise ContextError(
            f"{where}: unknown instruction: {keyword}",
            hint=f"did you mean {close[0].upper()}?" if close else None,
        )
    if keyword == "ONBUILD":
        if instruction.trigger == "ONBUILD":
            raise ContextError(f"{where}: chaining ONBUILD via 'ONBUILD ONBUILD' isn't allowed")
        if instruction.trigger in ("FROM", "MAINTAINER"):
            raise ContextError(f"{where}: {instruction.trigger} isn't allowed as an ONBUILD trigger")


def _parse_error(text: str, name: str, reason: str) -> ContextError:
    """The parser's error with the line it is about (the binding gives the reason only)."""
    if reason == "file with no instructions":
        return ContextError(f"{name} has no FROM instruction (it has no instructions at all)")
    line = _locate(text, reason)
    where = f"{name} line {line}" if line else name
    return ContextError(f"{where}: {reason}", hint="BuildKit's Dockerfile parser refused it")


def _locate(text: str, reason: str) -> int | None:
    """The line of the error ``reason``: BuildKit reads a Dockerfile line by line and stops at its
    first error, so every prefix of the file holding the failing instruction fails alike, and the
    prefix ending just before it does not. A bisection finds the shortest prefix failing alike,
    and probes at growing distances after it check that every longer one fails too (a prefix
    cutting an earlier heredoc or continued instruction can fail alike: then the search goes on
    after it). Bounded by the bytes parsed: a huge file may get no line."""
    lines = text.split("\n")
    sizes = [0]
    for line in lines:
        sizes.append(sizes[-1] + len(line) + 1)
    spent = [0]

    def fails_alike(count: int) -> bool:
        spent[0] += sizes[count]
        try:
            _buildkit.parse_string("\n".join(lines[:count]))
        except _buildkit.GoParseError as exc:
            return str(exc) == reason
        return False

    low, high = 0, len(lines)  # the prefix of ``low`` lines does not fail alike; that of ``high`` does
    while spent[0] <= _LOCATE_BUDGET:
        while high - low > 1 and spent[0] <= _LOCATE_BUDGET:
            middle = (low + high) // 2
            if fails_alike(middle):
                high = middle
            else:
                low = middle
        closed = _heredocs_end(lines, high)
        if closed is not None and not fails_alike(closed):
            low, high = closed, len(lines)  # an earlier heredoc, cut: the error is after it
            continue
        probes = [high + step for step in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89) if high + step < len(lines)]
        probes += [count for count in range(high + 144, len(lines), max(144, (len(lines) - high) // 8))]
        failing = next((count for count in probes if not fails_alike(count)), None)
        if spent[0] > _LOCATE_BUDGET:
            return None
        if failing is None:
            return high
        low, high = failing, len(lines)
    return None


def _heredocs_end(lines: list[str], line: int) -> int | None:
    """The line closing the last heredoc opened on ``line`` (from 1), if the file has it."""
    at = line
    opened = _HEREDOC_WORD.findall(lines[line - 1])
    for chomp, _, word in opened:
        while at < len(lines):
            candidate = lines[at].rstrip("\r\n")
            at += 1
            if (candidate.lstrip("\t") if chomp else candidate) == word:
                break
        else:
            return None
    return at if opened else None


def _directives(text: str, name: str) -> tuple[str, str, int]:
    """The escape token and the "# syntax=" frontend (with its line), as BuildKit finds them.

    The parser applies the escape directive itself but does not say which token it took; the
    frontend is what BuildKit's ``DetectSyntax`` reads (``#`` or ``//`` comments, a JSON document,
    after an optional ``#!`` line). A ``# check=`` directive (dockerfile 1.8) before ``# escape=``
    is where the pinned parser (BuildKit 0.12) and today's BuildKit read a file differently: refused.
    """
    lines = text.removeprefix("\ufeff").split("\n")
    escape = "\\"
    for index, raw in enumerate(lines):
        match = _DIRECTIVE.match(raw.rstrip("\r\n").lstrip())
        key = match.group(1).lower() if match else ""
        if key == "check":
            later = (_DIRECTIVE.match(other.rstrip("\r\n").lstrip()) for other in lines[index + 1 :])
            for other in later:
                if other is None or other.group(1).lower() not in ("syntax", "escape", "check"):
                    break
                if other.group(1).lower() == "escape":
                    raise ContextError(
                        f"{name} line {index + 1}: '# check=' comes before '# escape=': farm's"
                        " Dockerfile parser (BuildKit 0.12) would not see the escape directive",
                        hint="put '# escape=' first among the directives",
                    )
        if key not in ("syntax", "escape"):
            break
        if key == "escape":
            escape = match.group(2) if match else escape
    syntax, line = _detect_syntax(text)
    if syntax and not _FRONTEND.match(syntax):
        raise ContextError(
            f"{name} line {line}: unknown Dockerfile frontend '# syntax={syntax}': farm builds"
            " Dockerfile syntax only (the docker/dockerfile frontend)",
            hint="remove the directive, or name docker/dockerfile (e.g. # syntax=docker/dockerfile:1)",
        )
    return escape, syntax, line


def _detect_syntax(text: str) -> tuple[str, int]:
    """BuildKit's ``DetectSyntax``: the frontend named by the first directive block, or by JSON."""
    first, _, rest = text.partition("\n")
    offset = 0
    if first.startswith("#!"):
        text, offset = rest, 1
    for pattern in (_DIRECTIVE, _SYNTAX_DIRECTIVE):
        seen: set[str] = set()
        for index, raw in enumerate(text.split("\n")):
            match = pattern.match(raw.rstrip("\r\n"))
            if not match or match.group(1).lower() not in ("syntax", "escape", "check"):
                break
            key = match.group(1).lower()
            if key in seen:
                break
            seen.add(key)
            if key == "syntax":
                return match.group(2).split(" ", 1)[0], index + 1 + offset
    try:
        document = json.loads(text)
    except ValueError:
        return "", 0
    if isinstance(document, dict) and isinstance(document.get("syntax"), str) and document["syntax"]:
        return str(document["syntax"]), 1 + offset
    return "", 0


# --- stages and the images they pull ---------------------------------------------------------------


@dataclass
class _Stages:
    """The stages of a Dockerfile for one target and build platform, as ``dockerfile2llb`` sees them."""

    parsed: Dockerfile
    stages: list[Stage] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # each stage's FROM among the instructions
    uses: list[ImageUse] = field(default_factory=list)


def parse_stages(
    dockerfile: str,
    *,
    target: Platform,
    build: Platform,
    build_args: dict[str, str],
    name: str = "Dockerfile",
) -> list[Stage]:
    """Find each stage's base, with global ARGs and BuildKit's platform ARGs expanded."""
    return _read_stages(dockerfile, target, build, build_args, {}, name).stages


def image_references(
    dockerfile: str,
    *,
    target: Platform,
    build: Platform,
    build_args: Mapping[str, str],
    contexts: Mapping[str, str] | None = None,
    name: str = "Dockerfile",
) -> list[ImageUse]:
    """Every image a build of ``dockerfile`` for ``target`` on a ``build`` node pulls, in order.

    ``contexts`` is the seam for named build contexts (``--build-context NAME=VALUE``), which farm
    does not take yet: a FROM, ``--from`` or mount ``from`` naming one (or a stage named like one)
    takes it instead. A ``docker-image://REF`` value is listed once, as a use of kind "context"
    (its reference to pin in the context's value); any other value (a folder, a URL,
    ``oci-layout://``) is no registry image and is not listed.
    """
    return _read_stages(dockerfile, target, build, build_args, contexts or {}, name).uses


def image_registries(dockerfile: str) -> set[str]:
    """The registries of the images ``dockerfile`` names literally (FROM, ``COPY --from``,
    ``RUN --mount=…,from=``); a name still holding a variable, a stage, ``scratch`` are none."""
    parsed = parse_dockerfile(dockerfile)
    stage_names = {
        instruction.arguments[2].lower()
        for instruction in parsed.instructions
        if instruction.keyword == "FROM" and len(instruction.arguments) == 3
    }
    names: list[str] = []
    for instruction in parsed.instructions:
        if instruction.keyword == "FROM" and instruction.arguments:
            names.append(instruction.arguments[0])
        elif instruction.keyword in ("COPY", "ADD"):
            names += [value for value in instruction.flag_values("from") if value]
        elif instruction.keyword == "RUN":
            for value in instruction.flag_values("mount"):
                names += [v for k, v in _mount_fields_or_none(value or "") if k == "from" and v]
    hosts = set()
    for text in names:
        if "$" in text or text == "scratch" or text.lower() in stage_names or _INDEX.match(text):
            continue
        try:
            hosts.add(parse_reference(text).registry)
        except FarmError:
            continue
    return hosts


def mount_fields(value: str) -> list[tuple[str, str | None]]:
    """A ``--mount`` flag's fields as ``(key, value)``, keys lower-cased (None for a bare key).

    The value is CSV, as BuildKit reads it (``csvvalue.Fields``); ``ValueError`` if it is not."""
    try:
        rows = list(csv.reader(io.StringIO(value), strict=True))
    except csv.Error as exc:
        raise ValueError(f"failed to parse csv mounts: {exc}") from exc
    if len(rows) > 1:
        raise ValueError("failed to parse csv mounts: a line break")
    fields: list[tuple[str, str | None]] = []
    for item in rows[0] if rows else []:
        key, has_value, text = item.partition("=")
        fields.append((key.lower(), text if has_value else None))
    return fields


def _mount_fields_or_none(value: str) -> list[tuple[str, str | None]]:
    try:
        return mount_fields(value)
    except ValueError:
        return []


def _read_stages(
    text: str,
    target: Platform,
    build: Platform,
    build_args: Mapping[str, str],
    contexts: Mapping[str, str],
    name: str = "Dockerfile",
) -> _Stages:
    parsed = parse_dockerfile(text, name=name)
    lexer = _Lexer(parsed.escape)
    images = _ContextImages(contexts, target, name)
    variables = {**target.build_args("TARGET"), **build.build_args("BUILD")}
    found = _Stages(parsed)
    for index, instruction in enumerate(parsed.instructions):
        where = f"{name} line {instruction.line}"
        if instruction.keyword == "FROM":
            stage, use = _read_from(instruction, where, lexer, variables, found.stages, target, images)
            found.stages.append(stage)
            found.indexes.append(index)
            found.uses += [use] if use else []
        elif not found.stages:
            if instruction.keyword != "ARG":
                raise ContextError(
                    f"{where}: {instruction.keyword} before the first FROM (no build stage yet)",
                    hint="only ARG may come before the first FROM",
                )
            _read_global_arg(instruction, where, lexer, variables, build_args)
    if not found.stages:
        raise ContextError(f"{name} has no FROM instruction")
    names = [stage.name for stage in found.stages]
    for position, (stage, start) in enumerate(zip(found.stages, found.indexes, strict=True)):
        end = found.indexes[position + 1] if position + 1 < len(found.indexes) else len(parsed.instructions)
        for instruction in parsed.instructions[start + 1 : end]:
            where = f"{name} line {instruction.line}"
            if instruction.keyword in ("COPY", "ADD"):
                found.uses += _copy_uses(instruction, where, lexer, names, stage, images)
            elif instruction.keyword == "RUN":
                found.uses += _mount_uses(instruction, where, names, stage, images)
    found.uses = images.listed(sorted(found.uses, key=lambda use: use.line))
    return found


def _read_global_arg(
    instruction: Instruction,
    where: str,
    lexer: _Lexer,
    variables: dict[str, str],
    build_args: Mapping[str, str],
) -> None:
    """An ARG before the first FROM, as ``dockerfile2llb`` takes it: a ``--build-arg`` wins, else the
    default (expanded); declared without either, it stays unset."""
    if not instruction.arguments:
        raise ContextError(f"{where}: ARG requires at least one argument")
    for declaration in instruction.arguments:
        key, has_default, default = declaration.partition("=")
        if not key:
            raise ContextError(f"{where}: ARG names can not be blank")
        if key in build_args:
            variables[key] = build_args[key]
        elif has_default:
            variables[key] = lexer.expand(default, variables, where)


def _read_from(
    instruction: Instruction,
    where: str,
    lexer: _Lexer,
    variables: dict[str, str],
    earlier: list[Stage],
    target: Platform,
    images: _ContextImages,
) -> tuple[Stage, ImageUse | None]:
    platform_flag = ""
    seen = False
    for flag in instruction.flags:
        key, has_value, value = flag[2:].partition("=")
        if key != "platform":
            raise ContextError(f"{where}: unknown FROM flag {flag.partition('=')[0]!r}")
        if not has_value:
            raise ContextError(f"{where}: FROM flag --platform needs a value: --platform=VALUE")
        if seen:
            raise ContextError(f"{where}: FROM has --platform twice")
        seen = True
        platform_flag = lexer.expand(value, variables, where)
        if not platform_flag:
            raise ContextError(
                f"{where}: --platform={value} expands to nothing",
                hint="declare the ARG it names before the first FROM, or give it with --build-arg",
            )
    words = instruction.arguments
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
        raise ContextError(f"{where}: expected 'FROM [--platform=P] IMAGE [AS NAME]'")
    name = words[2].lower() if len(words) == 3 else ""
    if name and not _STAGE_NAME.match(name):
        raise ContextError(
            f"{where}: invalid name for build stage: {name!r}, name can't start with a number or"
            " contain symbols"
        )
    source = lexer.expand(words[0], variables, where)
    if not source:
        raise ContextError(f"{where}: base name ({words[0]}) should not be blank")
    stage = Stage(instruction.line, instruction.last_line, name, platform_flag, source, None)
    if source == "scratch" or source in {stage.name for stage in earlier if stage.name}:
        return stage, None
    platform = target
    if platform_flag:
        try:
            platform = parse_platform(platform_flag)
        except PlatformError as exc:
            raise ContextError(f"{where}: {exc.message}", hint=exc.hint) from exc
    # A named context named like the stage replaces it; one named like its base replaces that.
    context = images.find(name, normalise=False) if name else None
    context = context or images.find(source)
    if context is not None:
        return stage, images.use(context, instruction, stage, platform)
    base = BaseImage(_reference(source, where), platform)
    stage = Stage(stage.line, stage.last_line, name, platform_flag, source, base)
    return stage, ImageUse("from", instruction.line, instruction.last_line, source, base, stage)


def _copy_uses(
    instruction: Instruction,
    where: str,
    lexer: _Lexer,
    names: list[str],
    stage: Stage,
    images: _ContextImages,
) -> list[ImageUse]:
    """``COPY --from=IMAGE``: BuildKit takes a stage index, then a stage name (any stage, in any
    case), then ``scratch``; anything else is an image, pulled for the target platform."""
    values = instruction.flag_values("from")
    if len(values) > 1:
        raise ContextError(f"{where}: duplicate flag specified: --from")
    if not values:
        return []
    written = values[0]
    if written is None:
        raise ContextError(f"{where}: missing a value on flag: --from")
    if not written:
        return []
    if lexer.expand(written, {}, where) != written:
        raise ContextError(
            f"{where}: variable expansion is not supported for --from={written}",
            hint="define a stage with FROM using an ARG from the global scope, and copy from it",
        )
    if _INDEX.match(written):
        if not 0 <= int(written) < len(names):
            raise ContextError(f"{where}: invalid stage index {written}")
        return []
    return _image_named(written, "copy", instruction, where, names, stage, images)


def _mount_uses(
    instruction: Instruction, where: str, names: list[str], stage: Stage, images: _ContextImages
) -> list[ImageUse]:
    """``RUN --mount=…,from=IMAGE``: a stage by name (in any case), ``scratch``, else an image."""
    uses = []
    for value in instruction.flag_values("mount"):
        if value is None:
            raise ContextError(f"{where}: missing a value on flag: --mount")
        try:
            fields = mount_fields(value)
        except ValueError as exc:
            raise ContextError(f"{where}: --mount={value}: {exc}") from None
        for key, written in fields:
            if key != "from" or not written:
                continue
            if "$" in written[:-1]:
                raise ContextError(
                    f"{where}: 'from' doesn't support variable expansion, define alias stage instead"
                )
            uses += _image_named(written, "mount", instruction, where, names, stage, images)
    return uses


def _image_named(
    written: str,
    kind: ImageKind,
    instruction: Instruction,
    where: str,
    names: list[str],
    stage: Stage,
    images: _ContextImages,
) -> list[ImageUse]:
    if written.lower() in names or written == "scratch":
        return []
    context = images.find(written)
    if context is not None:
        use = images.use(context, instruction, stage, images.target)
        return [use] if use else []
    image = BaseImage(_reference(written, where), images.target)
    return [ImageUse(kind, instruction.line, instruction.last_line, written, image, stage)]


class _ContextImages:
    """The seam for named build contexts (``--build-context NAME=VALUE``).

    BuildKit's ``dockerui.namedContext`` consults them before a registry: for a stage's name, for
    a FROM base, for ``--from`` and mount ``from``. Farm takes no named contexts yet, so the
    orchestration passes none; when it does, their values arrive here, and each image one names is
    listed once (kind "context") for the orchestration to pin in the context's value.
    """

    def __init__(self, contexts: Mapping[str, str], target: Platform, name: str) -> None:
        self._contexts = contexts
        self.target = target
        self._name = name

    def find(self, name: str, *, normalise: bool = True) -> str | None:
        """The context that replaces ``name``, by its name as written or (an image) normalised."""
        if name in self._contexts or not normalise:
            return name if name in self._contexts else None
        try:
            normalised = str(parse_reference(name))
        except FarmError:
            return None
        for key in self._contexts:
            try:
                if str(parse_reference(key)) == normalised:
                    return key
            except FarmError:
                continue
        return None

    def use(
        self, context: str, instruction: Instruction, stage: Stage, platform: Platform
    ) -> ImageUse | None:
        value = self._contexts[context]
        if not value.startswith("docker-image://"):
            return None  # a folder, a URL, an OCI layout: nothing to pull from a registry
        written = value.removeprefix("docker-image://")
        where = f"build context {context}"
        image = BaseImage(_reference(written, where), platform)
        return ImageUse("context", instruction.line, instruction.last_line, written, image, stage, context)

    def listed(self, uses: list[ImageUse]) -> list[ImageUse]:
        """Each context's image once, however many instructions name it."""
        seen: set[tuple[str, BaseImage]] = set()
        kept = []
        for use in uses:
            if use.kind == "context":
                if (use.context, use.image) in seen:
                    continue
                seen.add((use.context, use.image))
            kept.append(use)
        return kept


def _reference(text: str, where: str) -> Reference:
    try:
        return parse_reference(text)
    except FarmError as exc:
        raise ContextError(f"{where}: {exc.message}", hint=exc.hint) from exc


# --- pinning ---------------------------------------------------------------------------------------


def pin_bases(dockerfile: str, stages: list[Stage], digests: dict[BaseImage, str]) -> str:
    """The Dockerfile with each registry base replaced by its per-platform digest."""
    edits = {
        stage.line: (stage.last_line, _pinned_from(stage, digests[stage.base]))
        for stage in stages
        if stage.base is not None
    }
    return _rewrite(dockerfile, edits)


def pin_images(dockerfile: str, uses: Sequence[ImageUse], digests: Mapping[BaseImage, str]) -> str:
    """The Dockerfile with every image ``uses`` lists (``image_references``) replaced by its
    per-platform digest: FROM lines as ``pin_bases`` writes them, ``COPY --from=`` and mount
    ``from=`` values as ``REGISTRY/REPOSITORY@DIGEST``. An instruction spanning several lines
    becomes one (heredoc bodies stay as they are); every other line is kept byte for byte.
    Uses of kind "context" are pinned in the context's value, not here."""
    parsed = parse_dockerfile(dockerfile)
    by_line = {instruction.line: instruction for instruction in parsed.instructions}
    edits: dict[int, tuple[int, str]] = {}
    for line in sorted({use.line for use in uses if use.kind != "context"}):
        here = [use for use in uses if use.line == line and use.kind != "context"]
        if here[0].kind == "from":
            edits[line] = (here[0].last_line, _pinned_from(here[0].stage, digests[here[0].image]))
            continue
        pinned = {use.written: str(use.image.reference.with_digest(digests[use.image])) for use in here}
        edits[line] = (here[0].last_line, _pinned_instruction(by_line[line], pinned))
    return _rewrite(dockerfile, edits)


def _pinned_from(stage: Stage, digest: str) -> str:
    assert stage.base is not None
    parts = ["FROM"]
    if stage.platform_flag:
        parts.append(f"--platform={stage.platform_flag}")
    parts.append(str(stage.base.reference.with_digest(digest)))
    if stage.name:
        parts += ["AS", stage.name]
    return " ".join(parts)


def _pinned_instruction(instruction: Instruction, pinned: Mapping[str, str]) -> str:
    """``instruction`` as one line (plus its heredocs), its ``--from`` and mount ``from`` values
    replaced: what BuildKit's parser gives back for it, but for those values."""
    flags = []
    for flag in instruction.flags:
        key, has_value, value = flag[2:].partition("=")
        if has_value and key == "from" and value in pinned:
            value = pinned[value]
        elif has_value and key == "mount":
            value = _pinned_mount(value, pinned)
        flags.append(_quoted_flag(f"--{key}={value}" if has_value else f"--{key}"))
    if instruction.json:
        arguments = json.dumps(list(instruction.arguments), ensure_ascii=False)
    else:
        arguments = " ".join(instruction.arguments)
    text = " ".join([instruction.keyword, *flags, arguments])
    bodies = [heredoc.content + heredoc.name for heredoc in instruction.heredocs]
    return "\n".join([text, *bodies])


def _pinned_mount(value: str, pinned: Mapping[str, str]) -> str:
    rows = list(csv.reader(io.StringIO(value)))
    fields = []
    for item in rows[0] if rows else []:
        key, has_value, text = item.partition("=")
        if has_value and key.lower() == "from" and text in pinned:
            item = f"{key}={pinned[text]}"
        fields.append(item)
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def _quoted_flag(flag: str) -> str:
    """A flag written so that the parser's ``extractBuilderFlags`` reads it back as ``flag``: a
    flag word must start with "--", so only its value may be quoted (backslash escaping)."""
    name, has_value, value = flag.partition("=")
    if not has_value or not re.search(r"[\s'\"\\]", value):
        return flag
    return f'{name}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rewrite(text: str, edits: Mapping[int, tuple[int, str]]) -> str:
    """``text`` with lines ``first..last`` (from 1) replaced for each edit, split at "\\n" only as
    BuildKit splits (a "\\r" before it is whitespace; ``str.splitlines`` would also split at form
    feeds, U+2028 and the like, which are ordinary characters inside an instruction)."""
    lines = text.split("\n")
    for first in sorted(edits, reverse=True):
        last, replacement = edits[first]
        lines[first - 1 : last] = [replacement]
    return "\n".join(lines)


# --- BuildKit's shell-word expansion (frontend/dockerfile/shell/lex.go) -----------------------------


class _ExpansionError(Exception):
    pass


class _Lexer:
    """``shell.Lex.ProcessWord``: one word expanded as BuildKit expands FROM, ``--platform`` and
    ARG defaults. A port of lex.go's ``processStopOn``, quotes, ``processDollar`` and patterns."""

    def __init__(self, escape: str) -> None:
        self._escape = escape
        self._text = ""
        self._at = 0
        self._env: Mapping[str, str] = {}
        self._raw_escapes = False

    def expand(self, word: str, env: Mapping[str, str], where: str) -> str:
        self._text, self._at, self._env, self._raw_escapes = word, 0, env, False
        try:
            return self._until(None, raw_escapes=False)
        except _ExpansionError as exc:
            raise ContextError(f"{where}: cannot expand {word!r}: {exc}") from None

    def _peek(self) -> str:
        return self._text[self._at] if self._at < len(self._text) else ""

    def _next(self) -> str:
        char = self._peek()
        self._at += 1 if char else 0
        return char

    def _until(self, stop: str | None, raw_escapes: bool) -> str:
        saved, self._raw_escapes = self._raw_escapes, raw_escapes
        try:
            result: list[str] = []
            while self._peek():
                char = self._peek()
                if stop is not None and char == stop:
                    self._next()
                    return "".join(result)
                if char == "$":
                    result.append(self._dollar())
                elif char == "'":
                    result.append(self._single_quoted())
                elif char == '"':
                    result.append(self._double_quoted())
                else:
                    char = self._next()
                    if char == self._escape:
                        if self._raw_escapes:
                            result.append(char)
                        char = self._next()
                        if not char:
                            break
                    result.append(char)
            if stop is not None:
                raise _ExpansionError(f"unexpected end of statement while looking for matching {stop}")
            return "".join(result)
        finally:
            self._raw_escapes = saved

    def _single_quoted(self) -> str:
        self._next()
        result: list[str] = []
        while True:
            char = self._next()
            if not char:
                raise _ExpansionError("unexpected end of statement while looking for matching single-quote")
            if char == "'":
                return "".join(result)
            result.append(char)

    def _double_quoted(self) -> str:
        self._next()
        result: list[str] = []
        while True:
            char = self._peek()
            if not char:
                raise _ExpansionError("unexpected end of statement while looking for matching double-quote")
            if char == '"':
                self._next()
                return "".join(result)
            if char == "$":
                result.append(self._dollar())
                continue
            char = self._next()
            if char == self._escape:
                if self._raw_escapes:
                    result.append(char)
                if not self._peek():
                    continue
                if self._peek() in ('"', "$", self._escape):
                    char = self._next()
            result.append(char)

    def _dollar(self) -> str:
        self._next()
        if self._peek() != "{":
            name = self._name()
            return self._env.get(name, "") if name else "$"
        self._next()
        if not self._peek():
            raise _ExpansionError("syntax error: missing '}'")
        if self._peek() in "{}:":
            raise _ExpansionError("syntax error: bad substitution")
        name = self._name()
        char = self._next()
        modifier = char
        if char == "}":
            return self._env.get(name, "")
        if char == "/":
            return self._replace(name)
        null_is_unset = char == ":"
        if null_is_unset:
            char = self._next()
            modifier += char
        elif char not in ("+", "-", "?", "#", "%") or not char:
            raise _ExpansionError(f"unsupported modifier ({modifier}) in substitution")
        patterned = char in ("#", "%") and char != ""
        if null_is_unset and patterned:
            raise _ExpansionError(f"unsupported modifier ({modifier}) in substitution")
        word = self._word_until_brace(patterned)
        is_set = name in self._env
        value = self._env.get(name, "")
        empty = not is_set or (null_is_unset and value == "")
        if char == "-":
            return word if empty else value
        if char == "+":
            return "" if empty else word
        if char == "?":
            if not is_set:
                raise _ExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _ExpansionError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if char in ("#", "%") and char:
            greedy = word.startswith(char)
            pattern = word[1:] if greedy else word
            if char == "%":
                return _trim_suffix(pattern, value, greedy)
            return _trim_prefix(pattern, value, greedy)
        raise _ExpansionError(f"unsupported modifier ({modifier}) in substitution")

    def _word_until_brace(self, raw_escapes: bool) -> str:
        try:
            return self._until("}", raw_escapes)
        except _ExpansionError:
            if not self._peek():
                raise _ExpansionError("syntax error: missing '}'") from None
            raise

    def _replace(self, name: str) -> str:
        every = self._peek() == "/"
        if every:
            self._next()
        try:
            pattern = self._until("/", raw_escapes=True)
        except _ExpansionError:
            if not self._peek():
                raise _ExpansionError("syntax error: missing '/' in ${}") from None
            raise
        replacement = self._word_until_brace(raw_escapes=True)
        value = self._env.get(name, "")
        regex = _shell_pattern(pattern, greedy=True, anchored=False)
        if every:
            return regex.sub(lambda _: replacement, value)
        return regex.sub(lambda _: replacement, value, count=1)

    def _name(self) -> str:
        name: list[str] = []
        while self._peek():
            char = self._peek()
            if not name and char.isdecimal():
                while self._peek().isdecimal():
                    name.append(self._next())
                return "".join(name)
            if not name and char in "@*#?-$!0":
                return self._next()
            if not (char.isalpha() or char.isdecimal() or char == "_"):
                break
            name.append(self._next())
        return "".join(name)


def _shell_pattern(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """lex.go's ``convertShellPatternToRegex``: ``?`` one character, ``*`` any run (shortest unless
    greedy), ``\\`` escaping ``*``, ``?`` and itself; no bracket expressions."""
    out = ["^"] if anchored else []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            out.append(".*" if greedy else ".*?")
        elif char == "?":
            out.append(".")
        elif char == "\\":
            if index < len(pattern) and pattern[index] in "}/":
                continue
            escaped = pattern[index] if index < len(pattern) else ""
            index += 1
            if escaped not in ("*", "?", "\\"):
                raise _ExpansionError(
                    f"invalid pattern ({pattern}) in substitution: invalid escape '\\{escaped}'"
                )
            out.append("\\" + escaped)
        else:
            out.append(re.escape(char) if char in "[]{}.+()|^$" else char)
    return re.compile("".join(out))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _shell_pattern(pattern, greedy=greedy, anchored=True).search(value)
    return value[match.end() :] if match else value


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    """The shortest (or longest) match at the end: lex.go reverses the pattern (keeping each escape
    before the character it escapes) and the value, and trims a prefix of those."""
    tokens = re.findall(r"\\.|.", pattern, flags=re.DOTALL)
    return _trim_prefix("".join(reversed(tokens)), value[::-1], greedy)[::-1]
