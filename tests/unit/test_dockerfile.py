"""farm.dockerfile: each stage's base as BuildKit would resolve it, and pinning bases by digest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.dockerfile import BaseImage, Stage, parse_stages, pin_bases
from farm.errors import ContextError, InputError
from farm.platforms import Platform
from farm.registry.name import parse_reference

_SETTINGS = settings(database=None, deadline=None, max_examples=50)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def stages(text: str, *, target: Platform = ARM64, build: Platform = AMD64, **build_args: str) -> list[Stage]:
    return parse_stages(text, target=target, build=build, build_args=build_args)


def bases(text: str, **kwargs: object) -> list[str | None]:
    """Each stage's base as ``reference platform`` (None for scratch and earlier stages)."""
    return [
        f"{stage.base.reference} {stage.base.platform}" if stage.base else None
        for stage in stages(text, **kwargs)  # type: ignore[arg-type]
    ]


def test_single_stage_defaults_to_the_target_platform() -> None:
    [stage] = stages("FROM alpine:3.20\nRUN true\n")
    assert stage == Stage(
        line=0,
        last_line=0,
        name="",
        platform_flag="",
        source="alpine:3.20",
        base=BaseImage(parse_reference("alpine:3.20"), ARM64),
    )


def test_global_arg_defaults_expand_in_from() -> None:
    text = 'ARG VERSION=3.20\nARG IMAGE="alpine"\nFROM ${IMAGE}:$VERSION\n'
    assert bases(text) == ["docker.io/library/alpine:3.20 linux/arm64"]


def test_build_args_override_global_arg_defaults() -> None:
    text = "ARG VERSION=3.20\nARG REGISTRY\nFROM ${REGISTRY:-docker.io}/library/alpine:$VERSION\n"
    assert bases(text, VERSION="3.19") == ["docker.io/library/alpine:3.19 linux/arm64"]
    assert bases(text, REGISTRY="localhost:5000") == ["localhost:5000/library/alpine:3.20 linux/arm64"]


def test_undeclared_build_args_do_not_reach_from() -> None:
    assert bases("FROM alpine:${VERSION:-3.18}\n", VERSION="3.20") == [
        "docker.io/library/alpine:3.18 linux/arm64"
    ]


def test_default_and_alternative_forms() -> None:
    text = (
        "ARG EMPTY=\nARG SET=yes\n"
        "FROM alpine:${EMPTY:-dflt}\nFROM alpine:x${SET:+alt}\nFROM alpine:y${EMPTY:+alt}\n"
    )
    assert [s.source for s in stages(text)] == ["alpine:dflt", "alpine:xalt", "alpine:y"]


def test_a_global_arg_default_may_use_an_earlier_one() -> None:
    text = "ARG BASE=alpine\nARG IMAGE=${BASE}:3.20\nFROM $IMAGE\n"
    assert bases(text) == ["docker.io/library/alpine:3.20 linux/arm64"]


def test_several_declarations_on_one_arg_line() -> None:
    assert bases("ARG A=alpine B=3.20\nFROM $A:$B\n") == ["docker.io/library/alpine:3.20 linux/arm64"]


def test_args_declared_inside_a_stage_do_not_reach_later_froms() -> None:
    text = "ARG V=1\nFROM alpine:$V\nARG V=2\nARG W=3\nFROM busybox:${V}${W:-x}\n"
    assert [s.source for s in stages(text)] == ["alpine:1", "busybox:1x"]


def test_buildkit_platform_args_are_automatic_in_from() -> None:
    text = (
        "FROM --platform=$BUILDPLATFORM golang:1.22 AS build\n"
        "FROM --platform=${TARGETPLATFORM} alpine AS run\n"
        "FROM --platform=$TARGETOS/$TARGETARCH busybox\n"
        "FROM alpine:$TARGETARCH$TARGETVARIANT\n"
    )
    assert bases(text, target=ARM_V7) == [
        "docker.io/library/golang:1.22 linux/amd64",
        "docker.io/library/alpine:latest linux/arm/v7",
        "docker.io/library/busybox:latest linux/arm/v7",
        "docker.io/library/alpine:armv7 linux/arm/v7",
    ]
    flags = [stage.platform_flag for stage in stages(text, target=ARM_V7)]
    assert flags == ["linux/amd64", "linux/arm/v7", "linux/arm", ""]


def test_stage_names_and_scratch_are_not_images() -> None:
    text = (
        "FROM golang AS Build\n"
        "FROM scratch\n"
        "FROM SCRATCH AS empty\n"
        "FROM build AS again\n"
        "FROM EMPTY\n"
        "FROM later\n"  # a name defined after this line is an image, as in BuildKit
        "FROM alpine AS later\n"
    )
    found = stages(text)
    assert [s.name for s in found] == ["build", "", "empty", "again", "", "", "later"]
    assert [s.base is None for s in found] == [False, True, True, True, True, False, False]
    assert found[5].base is not None
    assert str(found[5].base.reference) == "docker.io/library/later:latest"


def test_keywords_are_case_insensitive_and_may_be_followed_by_tabs() -> None:
    text = "arg V=3.20\nfrom\talpine:$V as base\nFrom  base\n"
    found = stages(text)
    assert [s.source for s in found] == ["alpine:3.20", "base"]
    assert found[0].name == "base"
    assert found[1].base is None


def test_multi_line_from_with_continuations_and_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM \\\n"
        "  --platform=$BUILDPLATFORM \\\n"
        "# a comment inside the instruction\n"
        "  golang:1.22 \\\n"
        "\n"
        "  AS build\n"
        "RUN go build \\\n"
        "  ./...\n"
        "FROM alpine\n"
    )
    first, second = stages(text)
    assert (first.line, first.last_line, first.name, first.platform_flag) == (1, 6, "build", "linux/amd64")
    assert first.base == BaseImage(parse_reference("golang:1.22"), AMD64)
    assert (second.line, second.last_line) == (9, 9)


def test_escape_directive_changes_the_continuation_character() -> None:
    text = "# escape=`\nFROM `\n  alpine AS a\nRUN dir c:\\\nFROM busybox\n"
    found = stages(text)
    assert [(s.line, s.last_line, s.source) for s in found] == [(1, 2, "alpine"), (4, 4, "busybox")]


def test_without_the_directive_a_backslash_continues() -> None:
    text = "FROM alpine\nRUN dir c:\\\nFROM busybox\n"
    assert [s.source for s in stages(text)] == ["alpine"]


def test_directives_count_only_at_the_top() -> None:
    text = "FROM alpine\n# escape=`\nRUN a `\nFROM busybox\n"
    assert [s.source for s in stages(text)] == ["alpine", "busybox"]
    text = "\n# escape=`\nFROM `\nalpine\n"
    with pytest.raises(InputError):
        stages(text)


def test_a_platform_flag_expanding_to_nothing_means_the_target() -> None:
    [stage] = stages("FROM --platform=$NOPE alpine\n")
    assert stage.platform_flag == ""
    assert stage.base is not None
    assert stage.base.platform == ARM64


def test_utf8_bom_and_unusual_characters_inside_lines() -> None:
    text = '\ufeffFROM alpine\nLABEL d="a\u2028b\x0cc\x85d"\nFROM busybox\n'
    found = stages(text)
    assert [(s.line, s.source) for s in found] == [(0, "alpine"), (2, "busybox")]


def test_crlf_line_endings() -> None:
    text = "ARG V=1\r\nFROM alpine:$V \\\r\n  AS a\r\nFROM a\r\n"
    found = stages(text)
    assert [(s.line, s.last_line, s.source, s.name) for s in found] == [
        (1, 2, "alpine:1", "a"),
        (3, 3, "a", ""),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n", "ARG A=1\n", "RUN true\n"])
def test_no_from_is_an_error(text: str) -> None:
    with pytest.raises(ContextError, match="no FROM"):
        stages(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM --pull alpine\n", "line 1: unknown FROM flag '--pull'"),
        ("RUN x\nFROM --platform linux/amd64 alpine\n", "line 2: unknown FROM flag '--platform'"),
        ("FROM\n", "line 1: expected"),
        ("FROM a b\n", "line 1: expected"),
        ("FROM a AS\n", "line 1: expected"),
        ("FROM a FOR b\n", "line 1: expected"),
        ("FROM a AS b c\n", "line 1: expected"),
        ("FROM alpine\n\nFROM --platform=linux/vax alpine\n", "line 3: unknown platform"),
    ],
)
def test_bad_from_instructions_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ContextError) as caught:
        stages(text)
    assert message in caught.value.message


def test_bad_platform_in_from_keeps_the_hint() -> None:
    with pytest.raises(ContextError) as caught:
        stages("FROM --platform=linux/vax alpine\n")
    assert caught.value.hint
    assert "linux/amd64" in caught.value.hint


def test_bad_image_reference_is_an_input_error() -> None:
    with pytest.raises(InputError, match="Alpine"):
        stages("FROM Alpine\n")


# --- pin_bases -------------------------------------------------------------------------------------


def pin(text: str, digests: dict[str, str], **kwargs: object) -> str:
    found = stages(text, **kwargs)  # type: ignore[arg-type]
    table = {stage.base: digests[stage.source] for stage in found if stage.base}
    return pin_bases(text, found, table)


def test_pin_replaces_each_registry_base_and_nothing_else() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG GO=1.22\n"
        "FROM --platform=$BUILDPLATFORM golang:${GO} AS Build\n"
        "RUN go build -o /app .\n"
        "\n"
        "FROM scratch AS empty\n"
        "FROM alpine\n"
        "COPY --from=build /app /app\n"
        "FROM build\n"
        'CMD ["/app"]\n'
    )
    pinned = pin(text, {"golang:1.22": DIGEST_A, "alpine": DIGEST_B})
    assert pinned == (
        "# syntax=docker/dockerfile:1\n"
        "ARG GO=1.22\n"
        f"FROM --platform=linux/amd64 docker.io/library/golang@{DIGEST_A} AS build\n"
        "RUN go build -o /app .\n"
        "\n"
        "FROM scratch AS empty\n"
        f"FROM docker.io/library/alpine@{DIGEST_B}\n"
        "COPY --from=build /app /app\n"
        "FROM build\n"
        'CMD ["/app"]\n'
    )


def test_pin_collapses_a_multi_line_from_and_keeps_what_follows() -> None:
    text = "FROM \\\n  alpine:3.20 \\\n  AS base\nRUN a \\\n  b\nFROM base\n"
    assert pin(text, {"alpine:3.20": DIGEST_A}) == (
        f"FROM docker.io/library/alpine@{DIGEST_A} AS base\nRUN a \\\n  b\nFROM base\n"
    )


def test_pin_keeps_the_absence_of_a_final_newline() -> None:
    assert pin("FROM alpine\nRUN true", {"alpine": DIGEST_A}) == (
        f"FROM docker.io/library/alpine@{DIGEST_A}\nRUN true"
    )


def test_pin_output_parses_to_the_pinned_bases() -> None:
    text = "ARG V=3.20\nFROM --platform=$TARGETPLATFORM alpine:$V AS a\nFROM a\nFROM busybox\n"
    pinned = pin(text, {"alpine:3.20": DIGEST_A, "busybox": DIGEST_B}, target=ARM_V7)
    again = stages(pinned, target=ARM_V7)
    assert [s.base.reference.digest if s.base else None for s in again] == [DIGEST_A, None, DIGEST_B]
    assert [s.base.platform if s.base else None for s in again] == [ARM_V7, None, ARM_V7]
    assert [s.name for s in again] == ["a", "", ""]


# Lines that are not instructions farm touches: anything without a newline that does not start
# with FROM/ARG and does not continue onto the next line.
_OTHER_LINE = st.text(
    alphabet=st.characters(exclude_characters="\n", exclude_categories=("Cs",)), max_size=30
).filter(
    lambda line: (
        not line.rstrip().endswith("\\")
        and not line.lstrip().upper().startswith(("FROM", "ARG"))
        and not line.lstrip().startswith("#")
    )
)
_FROM_LINE = st.sampled_from(
    [
        ("FROM alpine", "alpine"),
        ("FROM --platform=$BUILDPLATFORM golang:1.22 AS build", "golang:1.22"),
        ("  from busybox:latest as b2", "busybox:latest"),
        ("FROM scratch", None),
    ]
)


@_SETTINGS
@given(
    st.lists(st.tuples(_FROM_LINE, st.lists(_OTHER_LINE, max_size=4)), min_size=1, max_size=4),
    st.booleans(),
)
def test_pin_keeps_every_other_line_byte_for_byte(
    blocks: list[tuple[tuple[str, str | None], list[str]]], final_newline: bool
) -> None:
    lines: list[str] = []
    for (from_line, _), others in blocks:
        lines.append(from_line)
        lines.extend(others)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    sources = dict(from_line for from_line, _ in blocks)
    pinned = pin(text, {"alpine": DIGEST_A, "golang:1.22": DIGEST_B, "busybox:latest": DIGEST_A})
    original = text.split("\n")
    assert len(pinned.split("\n")) == len(original)
    for before, after in zip(original, pinned.split("\n"), strict=True):
        if sources.get(before):
            assert after.startswith("FROM ")
            assert "@sha256:" in after
        else:
            assert after == before
