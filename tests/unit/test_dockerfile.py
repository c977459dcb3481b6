"""farm.dockerfile: Dockerfiles read by BuildKit's parser, every image they pull found as BuildKit
would resolve it, and pinned by digest per platform."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.dockerfile import (
    BaseImage,
    ImageUse,
    Stage,
    image_references,
    image_registries,
    mount_fields,
    parse_dockerfile,
    parse_stages,
    pin_bases,
    pin_images,
)
from farm.errors import ContextError, InputError
from farm.platforms import Platform
from farm.registry.name import parse_reference

_SETTINGS = settings(database=None, deadline=None, max_examples=60)

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


def uses(
    text: str, *, target: Platform = ARM64, build: Platform = AMD64, **build_args: str
) -> list[ImageUse]:
    return image_references(text, target=target, build=build, build_args=build_args)


def found(text: str, **kwargs: object) -> list[tuple[str, int, str, str]]:
    """Each image use as (kind, line, reference, platform)."""
    return [
        (use.kind, use.line, str(use.image.reference), str(use.image.platform))
        for use in uses(text, **kwargs)  # type: ignore[arg-type]
    ]


def refused(text: str, **kwargs: object) -> ContextError:
    with pytest.raises(ContextError) as caught:
        uses(text, **kwargs)  # type: ignore[arg-type]
    return caught.value


# --- stages ----------------------------------------------------------------------------------------


def test_single_stage_defaults_to_the_target_platform() -> None:
    [stage] = stages("FROM alpine:3.20\nRUN true\n")
    assert stage == Stage(
        line=1,
        last_line=1,
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
        "ARG EMPTY=\nARG SET=yes\nARG UNSET\n"
        "FROM alpine:${EMPTY:-dflt}\nFROM alpine:x${SET:+alt}\nFROM alpine:y${EMPTY:+alt}\n"
        "FROM alpine:z${EMPTY-unset}\nFROM alpine:${UNSET-unset}\nFROM alpine:w${EMPTY+set}\n"
        "FROM alpine:v${UNSET+set}\nFROM alpine:${SET:?}\n"
    )
    assert [s.source for s in stages(text)] == [
        "alpine:dflt",
        "alpine:xalt",
        "alpine:y",
        "alpine:z",
        "alpine:unset",
        "alpine:wset",
        "alpine:v",
        "alpine:yes",
    ]


def test_dockerfile_1_7_trimming_and_replacing() -> None:
    text = (
        "ARG V=foobarbaz\n"
        "FROM a:${V#f*b}\nFROM a:${V##f*b}\nFROM a:${V%b*}\nFROM a:${V%%b*}\n"
        "FROM a:${V/ba/fo}\nFROM a:${V//ba/fo}\nFROM a:${V/#foo/x}\n"
    )
    assert [s.source for s in stages(text)] == [
        "a:arbaz",
        "a:az",
        "a:foobar",
        "a:foo",
        "a:fooforbaz",
        "a:fooforfoz",
        "a:foobarbaz",  # '#' is no anchor here: BuildKit matches the pattern "#foo" literally
    ]


def test_quotes_and_escapes_in_an_arg_default() -> None:
    text = 'ARG A=\'alp\'"ine" B=3\\.20 C="x\\$y"\nFROM $A:$B\nFROM a:${C:+c}\n'
    assert [s.source for s in stages(text)] == ["alpine:3.20", "a:c"]
    assert stages('ARG T="$A"\nFROM a:x$T\n')[0].source == "a:x"


def test_the_escape_directive_is_the_lexer_escape_too() -> None:
    text = "# escape=`\nARG T=a`$b\nFROM x:${T:+set}\n"
    assert stages(text)[0].source == "x:set"


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
        "FROM scratch AS empty\n"
        "FROM build AS again\n"
        "FROM empty\n"
        "FROM later\n"  # a name defined after this line is an image, as in BuildKit
        "FROM alpine AS later\n"
    )
    result = stages(text)
    assert [s.name for s in result] == ["build", "", "empty", "again", "", "", "later"]
    assert [s.base is None for s in result] == [False, True, True, True, True, False, False]
    assert result[5].base is not None
    assert str(result[5].base.reference) == "docker.io/library/later:latest"


@pytest.mark.parametrize("text", ["FROM SCRATCH\n", "FROM alpine AS b\nFROM B\n"])
def test_bases_match_scratch_and_stage_names_case_sensitively_as_buildkit_does(text: str) -> None:
    # BuildKit compares a FROM's base with "scratch" and the (lower-cased) stage names as written:
    # an upper-case one is an image name, which no registry accepts.
    assert "line" in refused(text).message


def test_keywords_are_case_insensitive_and_may_be_followed_by_tabs() -> None:
    text = "arg V=3.20\nfrom\talpine:$V as base\nFrom  base\n"
    result = stages(text)
    assert [s.source for s in result] == ["alpine:3.20", "base"]
    assert result[0].name == "base"
    assert result[1].base is None


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
    assert (first.line, first.last_line, first.name, first.platform_flag) == (2, 7, "build", "linux/amd64")
    assert first.base == BaseImage(parse_reference("golang:1.22"), AMD64)
    assert (second.line, second.last_line) == (10, 10)


def test_escape_directive_changes_the_continuation_character() -> None:
    text = "# escape=`\nFROM `\n  alpine AS a\nRUN dir c:\\\nFROM busybox\n"
    result = stages(text)
    assert [(s.line, s.last_line, s.source) for s in result] == [(2, 3, "alpine"), (5, 5, "busybox")]
    assert parse_dockerfile(text).escape == "`"


def test_without_the_directive_a_backslash_continues() -> None:
    text = "FROM alpine\nRUN dir c:\\\nFROM busybox\n"
    assert [s.source for s in stages(text)] == ["alpine"]


def test_directives_count_only_at_the_top() -> None:
    text = "FROM alpine\n# escape=`\nRUN a `\nFROM busybox\n"
    assert [s.source for s in stages(text)] == ["alpine", "busybox"]
    # After an empty line the directive is a comment, so "`" continues nothing.
    assert "unknown instruction: ALPINE" in refused("\n# escape=`\nFROM `\nalpine\n").message


def test_a_check_directive_before_escape_is_refused() -> None:
    # BuildKit 0.12 (farm's parser) stops reading directives at "# check=", today's BuildKit does
    # not: they would read this file differently.
    error = refused("# check=skip=all\n# escape=`\nFROM a `\n  AS b\n")
    assert "line 1" in error.message
    assert "escape" in error.message
    assert [s.name for s in stages("# escape=`\n# check=skip=all\nFROM a `\n  AS b\n")] == ["b"]


def test_a_platform_flag_expanding_to_nothing_is_refused_as_buildkit_does() -> None:
    error = refused("FROM --platform=$NOPE alpine\n")
    assert error.message == "Dockerfile line 1: --platform=$NOPE expands to nothing"
    assert error.hint


def test_utf8_bom_and_unusual_characters_inside_lines() -> None:
    text = '\ufeffFROM alpine\nLABEL d="a\u2028b\x0cc\x85d"\nFROM busybox\n'
    result = stages(text)
    assert [(s.line, s.source) for s in result] == [(1, "alpine"), (3, "busybox")]


def test_crlf_line_endings() -> None:
    text = "ARG V=1\r\nFROM alpine:$V \\\r\n  AS a\r\nFROM a\r\n"
    result = stages(text)
    assert [(s.line, s.last_line, s.source, s.name) for s in result] == [
        (2, 3, "alpine:1", "a"),
        (4, 4, "a", ""),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n", "ARG A=1\n"])
def test_no_from_is_an_error(text: str) -> None:
    with pytest.raises(ContextError, match="no FROM"):
        stages(text)


def test_only_arg_may_come_before_the_first_from() -> None:
    error = refused("ARG A=1\nRUN true\nFROM alpine\n")
    assert error.message.startswith("Dockerfile line 2: RUN before the first FROM")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM --pull alpine\n", "line 1: unknown FROM flag '--pull'"),
        ("ARG x\nFROM --platform linux/amd64 alpine\n", "line 2: FROM flag --platform needs a value"),
        ("FROM --platform=a --platform=b alpine\n", "line 1: FROM has --platform twice"),
        ("FROM\n", "line 1: expected"),
        ("FROM a b\n", "line 1: expected"),
        ("FROM a AS\n", "line 1: expected"),
        ("FROM a FOR b\n", "line 1: expected"),
        ("FROM a AS b c\n", "line 1: expected"),
        ("FROM a AS 1st\n", "line 1: invalid name for build stage: '1st'"),
        ("FROM a AS b/c\n", "line 1: invalid name for build stage"),
        ("ARG E=\nFROM $E\n", "line 2: base name ($E) should not be blank"),
        ("FROM alpine\n\nFROM --platform=linux/vax alpine\n", "line 3: unknown platform"),
        ("FROM a:${V\n", "line 1: cannot expand 'a:${V': unsupported modifier"),
        ("FROM a:${V:-x\n", "line 1: cannot expand 'a:${V:-x': syntax error: missing '}'"),
        ("FROM a:${V:x}\n", "unsupported modifier (:x) in substitution"),
        ("FROM a:${V:#x}\n", "unsupported modifier (:#) in substitution"),
        ("FROM a:${}\n", "bad substitution"),
        ("FROM a:${V?required}\n", "V: required"),
        ("FROM a:${V?}\n", "V: is not allowed to be unset"),
        ("ARG V=\nFROM a:${V:?}\n", "V: is not allowed to be empty"),
        ("FROM 'a\n", "looking for matching single-quote"),
        ("ARG\nFROM a\n", "line 1: ARG requires at least one argument"),
        ("ARG =x\nFROM a\n", "line 1: ARG names can not be blank"),
    ],
)
def test_bad_from_instructions_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ContextError) as caught:
        stages(text)
    assert message in caught.value.message
    assert caught.value.message.startswith("Dockerfile line")


def test_bad_platform_in_from_keeps_the_hint() -> None:
    with pytest.raises(ContextError) as caught:
        stages("FROM --platform=linux/vax alpine\n")
    assert caught.value.hint
    assert "linux/amd64" in caught.value.hint


def test_bad_image_reference_is_an_input_error_with_its_line() -> None:
    with pytest.raises(InputError, match=r"Dockerfile line 2: .*Alpine"):
        stages("ARG A=1\nFROM Alpine\n")


# --- the parser's verdicts, with their lines ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM a\nRUN <<EOT\necho\n", "Dockerfile line 2: unterminated heredoc"),
        (
            "FROM a\nRUN <<A\nx\nA\nRUN echo\nCOPY <<B /b\nnever ends\n",
            "Dockerfile line 6: unterminated heredoc",
        ),
        ("FROM a\nRUN x\nLABEL a\nRUN y\n", "Dockerfile line 3: LABEL must have two arguments"),
        (  # a prefix cut inside an earlier heredoc fails alike: the line is still the right one
            "FROM a\nRUN <<A\n" + "x\n" * 50 + "A\nCOPY <<B /b\n" + "y\n" * 30,
            "Dockerfile line 54: unterminated heredoc",
        ),
        (
            "FROM a\n" + ('RUN <<-"A" cat <<B\n' + "x\n" * 40 + "\tA\nb\nB\n") * 20 + "RUN <<Z\nnever\n",
            "Dockerfile line 882: unterminated heredoc",
        ),
        (
            "FROM a\n" + ("RUN <<A\n" + "x\n" * 40 + "A\n") * 5 + "LABEL a \\\n b=1\nLABEL q\nRUN x\n",
            "Dockerfile line 214: LABEL must have two arguments",
        ),
        ("FROM a\nLABEL a=1 \\\n  b=2\nRUN x\nLABEL c\n", "Dockerfile line 5: LABEL must have two arguments"),
        ("# escape=x\nFROM a\n", "Dockerfile line 1: invalid escape token 'x' does not match ` or \\"),
        ("# escape=`\n# escape=\\\nFROM a\n", "Dockerfile line 2: only one escape parser directive"),
        ("# syntax=a\n# syntax=b\nFROM a\n", "Dockerfile line 2: only one syntax parser directive"),
        ("FROM a\nRUN " + "x" * 70000 + "\n", "Dockerfile line 2: dockerfile line greater than max"),
        ("FROM a\nRNU true\n", "Dockerfile line 2: unknown instruction: RNU"),
        ("FROM a\nONBUILD ONBUILD RUN x\n", "Dockerfile line 2: chaining ONBUILD"),
        ("FROM a\nONBUILD FROM b\n", "Dockerfile line 2: FROM isn't allowed as an ONBUILD trigger"),
        ("FROM a\nENV A=<<EOT\nx\nEOT\n", "Dockerfile line 3: unknown instruction: X"),
        ("FROM a\nRUN x\x00y\n", "Dockerfile line 2: a NUL character"),
    ],
)
def test_what_the_parser_refuses_names_the_file_the_line_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(ContextError) as caught:
        parse_dockerfile(text)
    assert caught.value.message.startswith(message)
    assert caught.value.exit_code == 2


def test_errors_name_the_file_they_are_given() -> None:
    with pytest.raises(ContextError, match=r"^docker/app\.Dockerfile line 2: unknown instruction: RNU"):
        parse_dockerfile("FROM a\nRNU x\n", name="docker/app.Dockerfile")
    assert parse_dockerfile("FROM a\nRNU x\n".replace("RNU", "RUN"), name="x").name == "x"


def test_an_unknown_instruction_gets_a_suggestion() -> None:
    with pytest.raises(ContextError) as caught:
        parse_dockerfile("FROM a\nCOYP a b\n")
    assert caught.value.hint == "did you mean COPY?"


@pytest.mark.parametrize(
    ("text", "syntax", "line"),
    [
        ("# syntax=docker/dockerfile:1\nFROM a\n", "docker/dockerfile:1", 1),
        ("#syntax = docker/dockerfile:1.7-labs\nFROM a\n", "docker/dockerfile:1.7-labs", 1),
        (
            "# escape=`\n# SYNTAX=docker.io/docker/dockerfile-upstream:master\nFROM a\n",
            "docker.io/docker/dockerfile-upstream:master",
            2,
        ),
        ("#!/usr/bin/env buildctl\n# syntax=docker/dockerfile\nFROM a\n", "docker/dockerfile", 2),
        ("# syntax=docker/dockerfile:1.4 --extra\nFROM a\n", "docker/dockerfile:1.4", 1),
        ("# hello\n# syntax=other/frontend\nFROM a\n", "", 0),  # after a comment: a comment
        ("FROM a\n# syntax=other/frontend\n", "", 0),
        (
            f"# syntax=docker/dockerfile:1@sha256:{'c' * 64}\nFROM a\n",
            f"docker/dockerfile:1@sha256:{'c' * 64}",
            1,
        ),
    ],
)
def test_the_syntax_directive_as_buildkit_detects_it(text: str, syntax: str, line: int) -> None:
    parsed = parse_dockerfile(text)
    assert (parsed.syntax, parsed.syntax_line) == (syntax, line)


@pytest.mark.parametrize(
    "frontend", ["tonistiigi/pygen", "example.com/my/frontend:1", "docker/dockerfile-evil:1", "dockerfile:1"]
)
@pytest.mark.parametrize("comment", ["#", "//"])
def test_an_unknown_frontend_is_refused_naming_it(frontend: str, comment: str) -> None:
    with pytest.raises(ContextError) as caught:
        parse_dockerfile(f"{comment} syntax={frontend}\nFROM a\n")
    assert caught.value.message.startswith(
        f"Dockerfile line 1: unknown Dockerfile frontend '# syntax={frontend}'"
    )
    assert caught.value.hint


def test_heredocs_as_buildkit_reads_them() -> None:
    text = (
        "FROM a\n"
        "RUN <<EOT\nset -e\necho hi\nEOT\n"
        'COPY <<-"A" /a <<B /b\n\tx\n\tA\ny $V\nB\n'
        "RUN 3<<EOF cat /dev/fd/3\nhello\nEOF\n"
    )
    run, copy, fd = parse_dockerfile(text).instructions[1:]
    assert (run.line, run.last_line, run.arguments) == (2, 5, ("<<EOT",))
    assert [(h.name, h.content) for h in run.heredocs] == [("EOT", "set -e\necho hi\n")]
    assert (copy.line, copy.last_line) == (6, 10)
    assert [(h.name, h.content) for h in copy.heredocs] == [("A", "\tx\n"), ("B", "y $V\n")]
    assert [(h.name, h.fd) for h in fd.heredocs] == [("EOF", 3)]


def test_instructions_keep_flags_json_and_onbuild_triggers() -> None:
    text = (
        'FROM a\nCOPY --from=b --chmod=755 x y\nCMD ["a", "b"]\nONBUILD RUN --mount=type=cache,target=/c x\n'
    )
    _, copy, cmd, onbuild = parse_dockerfile(text).instructions
    assert copy.flag_values("from") == ["b"]
    assert copy.flag_values("chmod") == ["755"]
    assert copy.flag_values("link") == []
    assert (cmd.json, cmd.arguments) == (True, ("a", "b"))
    assert (onbuild.keyword, onbuild.trigger) == ("ONBUILD", "RUN")


def test_mount_fields_are_csv_with_lower_case_keys() -> None:
    assert mount_fields('Type=cache,target=/a,"id=x,y",ro') == [
        ("type", "cache"),
        ("target", "/a"),
        ("id", "x,y"),
        ("ro", None),
    ]
    with pytest.raises(ValueError, match="csv"):
        mount_fields('type=bind,"target=/a')


# --- every image a build pulls ------------------------------------------------------------------------

MULTI = """\
# syntax=docker/dockerfile:1.7
ARG GO=1.22 BASE="busybox"
FROM --platform=$BUILDPLATFORM golang:${GO} AS Build
COPY --from=alpine:3.20 /etc/os-release /x
RUN --mount=type=cache,target=/c \\
    --mount=from=busybox:1.36,target=/b,source=/bin \\
    --mount=from=build,target=/s \\
    go build
FROM ${BASE}
COPY --from=build /app /app
COPY --from=BUILD /app /app2
COPY --from=0 /app /app3
COPY --from=scratch / /
RUN --mount=type=bind,from=scratch,target=/e --mount=type=tmpfs,target=/t true
COPY --from=localhost:5000/x/y:1 <<EOF /z
hello
EOF
ONBUILD COPY --from=onbuild/image /a /b
"""


def test_every_image_reference_with_its_line_and_platform() -> None:
    assert found(MULTI) == [
        ("from", 3, "docker.io/library/golang:1.22", "linux/amd64"),
        # COPY --from and mount from images are pulled for the target platform, even in a
        # --platform=$BUILDPLATFORM stage: dockerfile2llb resolves them so.
        ("copy", 4, "docker.io/library/alpine:3.20", "linux/arm64"),
        ("mount", 5, "docker.io/library/busybox:1.36", "linux/arm64"),
        ("from", 9, "docker.io/library/busybox:latest", "linux/arm64"),
        ("copy", 15, "localhost:5000/x/y:1", "linux/arm64"),
    ]
    assert [use.stage.name for use in uses(MULTI)] == ["build", "build", "build", "", ""]
    assert uses(MULTI)[1].description == "line 4: COPY --from=alpine:3.20"
    assert uses(MULTI)[2].description == "line 5: RUN --mount=from=busybox:1.36"


def test_copy_from_may_name_a_later_stage_or_an_index() -> None:
    text = "FROM a\nCOPY --from=later /x /y\nCOPY --from=1 /x /y\nFROM b AS later\n"
    assert found(text) == [
        ("from", 1, "docker.io/library/a:latest", "linux/arm64"),
        ("from", 4, "docker.io/library/b:latest", "linux/arm64"),
    ]
    assert "invalid stage index 2" in refused(text.replace("--from=1", "--from=2")).message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ARG I=alpine\nFROM a\nCOPY --from=$I /x /y\n",
            "line 3: variable expansion is not supported for --from=$I",
        ),
        ('FROM a\nCOPY --from=\\"b\\" /x /y\n', 'line 2: variable expansion is not supported for --from="b"'),
        ("FROM a\nCOPY --from=\\'b /x /y\n", "line 2: cannot expand"),
        ("FROM a\nCOPY --from=b --from=c /x /y\n", "line 2: duplicate flag specified: --from"),
        ("FROM a\nCOPY --from /x /y\n", "line 2: missing a value on flag: --from"),
        ("FROM a\nRUN --mount=from=$I,target=/x true\n", "line 2: 'from' doesn't support variable expansion"),
        ("FROM a\nRUN --mount true\n", "line 2: missing a value on flag: --mount"),
        ('FROM a\nRUN --mount=type=bind,\\"target=/x true\n', "line 2: --mount="),
        ("FROM a\nCOPY --from=Alpine /x /y\n", "line 2: invalid repository name"),
    ],
)
def test_image_references_that_cannot_be_resolved_are_refused(text: str, message: str) -> None:
    assert message in refused(text).message


def test_onbuild_triggers_and_stages_after_the_target_are_not_this_builds() -> None:
    assert all(use.written != "onbuild/image" for use in uses(MULTI))


def test_named_contexts_seam() -> None:
    """farm takes no --build-context yet; this is how one will plug in (BuildKit's precedence)."""
    text = "FROM alpine AS base\nFROM base\nCOPY --from=busybox /a /b\nRUN --mount=from=tools,target=/t x\n"
    contexts = {
        "base": "docker-image://localhost:5000/lab/base:1",  # replaces the stage
        "busybox": "docker-image://localhost:5000/lab/busybox:2",  # replaces an image
        "tools": "/home/me/tools",  # a folder: nothing to pull
    }
    result = image_references(text, target=ARM64, build=AMD64, build_args={}, contexts=contexts)
    assert [(u.kind, u.line, u.context, str(u.image.reference)) for u in result] == [
        ("context", 1, "base", "localhost:5000/lab/base:1"),
        ("context", 3, "busybox", "localhost:5000/lab/busybox:2"),
    ]
    # The Dockerfile itself is not rewritten for contexts: their values are pinned instead.
    assert pin_images(text, result, {u.image: DIGEST_A for u in result}) == text
    normalised = image_references(
        "FROM docker.io/library/alpine:latest\n",
        target=ARM64,
        build=AMD64,
        build_args={},
        contexts={"alpine": "docker-image://mirror.lab/alpine:3"},
    )
    assert [u.kind for u in normalised] == ["context"]


def test_image_registries_lists_literal_references_only() -> None:
    text = (
        "ARG REG=evil.example\n"
        "FROM $REG/x\n"
        "FROM localhost:5000/a/b AS s\n"
        "COPY --from=s /a /b\n"
        "COPY --from=registry.lab:5443/c/d /a /b\n"
        "RUN --mount=from=other.lab/e,target=/e --mount=from=scratch,target=/f true\n"
        "COPY --from=0 /a /b\n"
        "FROM alpine\n"
    )
    assert image_registries(text) == {"localhost:5000", "registry.lab:5443", "other.lab", "docker.io"}


# --- pinning -------------------------------------------------------------------------------------------


def pin(text: str, digests: dict[str, str], **kwargs: object) -> str:
    result = stages(text, **kwargs)  # type: ignore[arg-type]
    table = {stage.base: digests[stage.source] for stage in result if stage.base}
    return pin_bases(text, result, table)


def pin_all(text: str, digest_of: dict[str, str] | None = None, **kwargs: object) -> str:
    listed = uses(text, **kwargs)  # type: ignore[arg-type]
    table = {use.image: (digest_of or {}).get(use.written, DIGEST_A) for use in listed}
    return pin_images(text, listed, table)


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
    expected = (
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
    assert pin(text, {"golang:1.22": DIGEST_A, "alpine": DIGEST_B}) == expected
    assert pin_all(text, {"golang:1.22": DIGEST_A, "alpine": DIGEST_B}) == expected


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


def test_pin_images_rewrites_copy_from_and_mount_from_and_keeps_heredocs() -> None:
    digests = {"golang:1.22": DIGEST_A, "busybox": DIGEST_B}
    pinned = pin_all(MULTI, digests)
    lines = pinned.split("\n")
    assert lines[3] == f"COPY --from=docker.io/library/alpine@{DIGEST_A} /etc/os-release /x"
    assert lines[4] == (
        f"RUN --mount=type=cache,target=/c --mount=from=docker.io/library/busybox@{DIGEST_A},"
        "target=/b,source=/bin --mount=from=build,target=/s go build"
    )
    assert lines[5] == f"FROM docker.io/library/busybox@{DIGEST_B}"
    assert lines[11:14] == [f"COPY --from=localhost:5000/x/y@{DIGEST_A} <<EOF /z", "hello", "EOF"]
    assert lines[14] == "ONBUILD COPY --from=onbuild/image /a /b"
    # What the pinned Dockerfile pulls is exactly the pinned images, from the same places.
    again = uses(pinned)
    assert [(u.kind, str(u.image.platform)) for u in again] == [
        (u.kind, str(u.image.platform)) for u in uses(MULTI)
    ]
    assert all(u.image.reference.digest for u in again)
    heredoc = parse_dockerfile(pinned).instructions[-2]
    assert [(h.name, h.content) for h in heredoc.heredocs] == [("EOF", "hello\n")]


def test_pinning_quotes_flags_the_parser_unquoted() -> None:
    text = (
        'FROM a\nRUN --mount="type=bind,from=busybox,target=/a b" --network=none'
        ' ["sh", "-c", "ls \'/a b\'"]\n'
    )
    pinned = pin_all(text)
    run = parse_dockerfile(pinned).instructions[1]
    assert run.flags == (
        f"--mount=type=bind,from=docker.io/library/busybox@{DIGEST_A},target=/a b",
        "--network=none",
    )
    assert run.json
    assert run.arguments == ("sh", "-c", "ls '/a b'")


def test_pinning_a_cache_mount_keeps_csv_quoting() -> None:
    # The parser takes the quotes off a flag, so CSV quoting needs them escaped.
    text = 'FROM a\nRUN --mount=type=cache,from=busybox,\\"id=x,y\\",target=/c true\n'
    run = parse_dockerfile(pin_all(text)).instructions[1]
    assert mount_fields(run.flag_values("mount")[0] or "") == [
        ("type", "cache"),
        ("from", f"docker.io/library/busybox@{DIGEST_A}"),
        ("id", "x,y"),
        ("target", "/c"),
    ]


def test_pinning_a_chomped_heredoc_keeps_its_body() -> None:
    text = "FROM a\nCOPY --from=b <<-EOT /x\n\tone\n\t\ttwo\n\tEOT\nRUN true\n"
    pinned = pin_all(text)
    copy = parse_dockerfile(pinned).instructions[1]
    assert [(h.name, h.content) for h in copy.heredocs] == [("EOT", "\tone\n\t\ttwo\n")]
    assert pinned.endswith("RUN true\n")


# Instructions that pinning leaves alone, one physical line each.
_OTHER_LINE = st.sampled_from(
    [
        "RUN true",
        "RUN echo 'FROM busybox'",
        "  run\tls -l /",
        'CMD ["sh", "-c", "echo \\u2028"]',
        "COPY --from=0 /a /b",  # a stage (by index): no image
        "ENV A=1 B=two",
        "LABEL x=y",
        "# FROM alpine",
        "",
        "  ",
        "WORKDIR /srv\r",
        "RUN --mount=type=cache,target=/c make",
        "USER 1000:1000",
    ]
)
_FROM_LINE = st.sampled_from(
    [
        ("FROM alpine AS build", "alpine"),
        ("FROM --platform=$BUILDPLATFORM golang:1.22 AS build", "golang:1.22"),
        ("  from busybox:latest as b2", "busybox:latest"),
        ("FROM scratch", None),
    ]
)
_IMAGE_LINE = st.sampled_from(
    [
        ("COPY --from=alpine:3 /a /b", "alpine:3"),
        ("RUN --mount=from=busybox,target=/b ls /b", "busybox"),
        ("copy --chown=1:1 --from=localhost:5000/t/x /a /b", "localhost:5000/t/x"),
    ]
)


@_SETTINGS
@given(
    st.lists(
        st.tuples(_FROM_LINE, st.lists(st.one_of(_OTHER_LINE, _IMAGE_LINE), max_size=4)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_pin_keeps_every_other_line_byte_for_byte(
    blocks: list[tuple[tuple[str, str | None], list[str | tuple[str, str]]]], final_newline: bool
) -> None:
    lines: list[str] = []
    pinned_lines: set[str] = set()
    for (from_line, source), others in blocks:
        lines.append(from_line)
        if source:
            pinned_lines.add(from_line)
        for other in others:
            if isinstance(other, tuple):
                lines.append(other[0])
                pinned_lines.add(other[0])
            else:
                lines.append(other)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    pinned = pin_all(text)
    original = text.split("\n")
    assert len(pinned.split("\n")) == len(original)
    for before, after in zip(original, pinned.split("\n"), strict=True):
        if before in pinned_lines:
            assert f"@{DIGEST_A}" in after
            assert after.split()[0].upper() == before.split()[0].upper()
        else:
            assert after == before
    # The pinned file names the same images in the same places, every one by digest.
    assert [(u.kind, u.line) for u in uses(pinned)] == [(u.kind, u.line) for u in uses(text)]
    assert all(u.image.reference.digest == DIGEST_A for u in uses(pinned))


# --- the shell-word lexer: properties -------------------------------------------------------------

_PLAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@_SETTINGS
@given(_PLAIN, _PLAIN)
def test_expansion_of_plain_words_and_variables(word: str, value: str) -> None:
    text = f"ARG V={value}\nFROM a:x\nFROM a:x\n"
    assert stages(text)[0].source == "a:x"
    result = stages(f"ARG V={value}\nFROM {word}$V${{V}}${{U:-{word}}}${{V:+{word}}}\n")
    assert result[0].source == word + value + value + word + word


@_SETTINGS
@given(_PLAIN, _PLAIN)
def test_trimming_a_literal_prefix_or_suffix_matches_str(prefix: str, rest: str) -> None:
    value = prefix + rest
    text = f"ARG V={value}\nFROM a:${{V#{prefix}}}\nFROM a:${{V%{rest}}}\n"
    first, second = stages(text)
    assert first.source == f"a:{value.removeprefix(prefix)}"
    assert second.source == f"a:{value.removesuffix(rest)}"


@_SETTINGS
@given(
    st.text(alphabet=st.characters(exclude_characters="\n\r\x00", exclude_categories=("Cs",)), max_size=40)
)
def test_any_line_either_parses_or_is_refused_with_farms_error(line: str) -> None:
    text = f"FROM alpine\n{line}\nRUN true\n"
    message = "Dockerfile"
    try:
        parse_dockerfile(text)
    except ContextError as exc:  # never the binding's own exception, nor a crash
        message = exc.message
    assert message.startswith("Dockerfile")
