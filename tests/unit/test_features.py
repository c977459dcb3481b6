"""farm.features: which Dockerfile features a Dockerfile uses (with lines), and which builders run them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import ContextError
from farm.features import FEATURES, PODMAN_BUILDAH, Builder, FeatureUse, detect_features, missing

_SETTINGS = settings(database=None, deadline=None, max_examples=80)


def detected(body: str, header: str = "FROM alpine AS base\n") -> list[tuple[int, str]]:
    return [(use.line, use.feature) for use in detect_features(header + body)]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("RUN <<EOT\nset -e\nEOT\n", [(2, "heredoc-run")]),
        ("RUN cat <<EOF > /x\nhi\nEOF\n", [(2, "heredoc-run")]),
        ("COPY <<EOT /x\nhi\nEOT\n", [(2, "heredoc-copy")]),
        ("ADD <<-EOT /x\n\thi\n\tEOT\n", [(2, "heredoc-copy")]),
        ("COPY --link a /b\n", [(2, "copy-link")]),
        ("ADD --link=true a /b\n", [(2, "copy-link")]),
        ("COPY --link=false a /b\n", []),
        ("COPY --parents a/b/c /d/\n", [(2, "copy-parents")]),
        ("COPY --exclude=*.log --exclude=*.tmp a /d\n", [(2, "copy-exclude"), (2, "copy-exclude")]),
        ("COPY --chmod=0755 a /b\n", [(2, "copy-chmod")]),
        ("COPY --chown=1:1 a /b\n", [(2, "copy-chown")]),
        ("ADD --checksum=sha256:" + "a" * 64 + " https://x/y.tgz /z\n", [(2, "add-checksum")]),
        ("ADD git@github.com:moby/buildkit.git#v0.14.1:docs /d\n", [(2, "add-git")]),
        ("ADD https://github.com/moby/buildkit.git /d\n", [(2, "add-git")]),
        ("ADD https://example.com/a.git?ref=main /d\n", [(2, "add-git")]),
        ("ADD ssh://git@example.com/a /d\n", [(2, "add-git")]),
        ("ADD https://example.com/archive.tar.gz /d\n", []),
        ("ADD ./git@notes.txt /d\n", []),
        (
            "ADD --keep-git-dir=true https://github.com/moby/buildkit.git /d\n",
            [(2, "add-git"), (2, "add-keep-git-dir")],
        ),
        ("ADD --unpack=true https://example.com/a.tar /d\n", [(2, "add-unpack")]),
        ("RUN --network=none true\n", [(2, "run-network")]),
        ("RUN --network=default true\n", [(2, "run-network")]),
        ("RUN --network=host true\n", [(2, "run-network-host")]),
        ("RUN --security=insecure true\n", [(2, "run-security")]),
        ("RUN --device=vendor.com/gpu=all true\n", [(2, "run-device")]),
        ("RUN --mount=target=/src make\n", [(2, "mount-bind")]),
        ("RUN --mount=type=bind,from=base,target=/b,rw true\n", [(2, "mount-bind")]),
        ("RUN --mount=type=cache,target=/c,sharing=locked,id=x true\n", [(2, "mount-cache")]),
        ("RUN --mount=type=cache,target=/c,from=base true\n", [(2, "mount-cache")]),
        ("RUN --mount=type=cache,target=/c,from=scratch true\n", [(2, "mount-cache")]),
        (
            "RUN --mount=type=cache,target=/c,from=busybox true\n",
            [(2, "mount-cache"), (2, "mount-cache-from-image")],
        ),
        ("RUN --mount=type=tmpfs,target=/t true\n", [(2, "mount-tmpfs")]),
        ("RUN --mount=type=tmpfs,target=/t,size=64m true\n", [(2, "mount-tmpfs"), (2, "mount-tmpfs-size")]),
        ("RUN --mount=type=secret,id=s true\n", [(2, "mount-secret")]),
        ("RUN --mount=type=secret,id=s,required=true true\n", [(2, "mount-secret")]),
        ("RUN --mount=type=secret,id=s,required true\n", [(2, "mount-required-bare"), (2, "mount-secret")]),
        ("RUN --mount=type=secret,id=s,env=TOKEN true\n", [(2, "mount-secret"), (2, "mount-secret-env")]),
        ("RUN --mount=type=ssh true\n", [(2, "mount-ssh")]),
        ("RUN --mount=TYPE=SSH,required true\n", [(2, "mount-required-bare"), (2, "mount-ssh")]),
        ("ENV X=${V#foo}\n", [(2, "expansion-patterns")]),
        ("LABEL x=${V%%.*}\nWORKDIR /${V//-/_}\n", [(2, "expansion-patterns"), (3, "expansion-patterns")]),
        ("ENV X=${V:-foo#bar}\nRUN echo ${V#foo}\n", []),  # RUN is the shell's to expand
        ('RUN echo hi\nCOPY a b\nCMD ["x"]\n', []),
        ("ONBUILD RUN --mount=type=cache,target=/c <<EOT\nx\nEOT\n", []),  # runs in later builds
    ],
)
def test_features_are_detected_with_their_lines(body: str, expected: list[tuple[int, str]]) -> None:
    assert detected(body) == sorted(expected)


def test_a_multi_line_instruction_is_reported_at_its_first_line() -> None:
    body = (
        "RUN apt-get update \\\n  && true\n"
        "RUN --mount=type=cache,target=/var/cache/apt \\\n    apt-get install -y gcc\n"
    )
    assert detected(body) == [(4, "mount-cache")]


def test_the_syntax_directive_and_what_farm_expands_itself() -> None:
    text = "# syntax=docker/dockerfile:1.4\nARG V=${X#y}\nFROM alpine:${V%.*}\nRUN true\n"
    assert detect_features(text) == [FeatureUse(1, "syntax", "docker/dockerfile:1.4")]


def test_uses_say_what_the_line_says() -> None:
    text = (
        "FROM a\nRUN --network=host --mount=type=cache,target=/c true\nCOPY --chmod=755 <<EOT /x\nhi\nEOT\n"
    )
    assert [(u.feature, u.text) for u in detect_features(text)] == [
        ("mount-cache", "--mount=type=cache,target=/c"),
        ("run-network-host", "--network=host"),
        ("copy-chmod", "COPY --chmod=755"),
        ("heredoc-copy", "COPY <<EOT"),
    ]
    assert detect_features(text)[0].title == "RUN --mount=type=cache"


def test_a_dockerfile_the_parser_refuses_is_farms_error() -> None:
    with pytest.raises(ContextError, match=r"^x\.Dockerfile line 2: unterminated heredoc"):
        detect_features("FROM a\nRUN <<EOT\n", name="x.Dockerfile")
    with pytest.raises(ContextError, match="unknown Dockerfile frontend"):
        detect_features("# syntax=tonistiigi/pygen\nFROM a\n")


# --- which builders run what ----------------------------------------------------------------------

# Every feature, one use each, as tried on this machine (see farm.features' docstring).
EVERYTHING = [
    FeatureUse(line, feature, "docker/dockerfile:1" if feature == "syntax" else feature)
    for line, feature in enumerate(sorted(FEATURES), start=1)
]

# What buildah 1.28.2 did here with each feature (True: built).
BUILDAH_1_28_CHECKED = {
    "heredoc-run": False,
    "heredoc-copy": False,
    "copy-link": False,
    "copy-parents": False,
    "copy-exclude": False,
    "copy-chmod": True,
    "copy-chown": True,
    "add-checksum": False,
    "add-git": False,
    "add-keep-git-dir": False,
    "run-network": False,
    "run-network-host": False,
    "run-security": False,
    "mount-bind": True,
    "mount-cache": True,
    "mount-tmpfs": True,
    "mount-secret": True,
    "mount-ssh": True,
    "mount-cache-from-image": False,
    "mount-tmpfs-size": False,
    "mount-secret-env": False,
    "mount-required-bare": False,
    "expansion-patterns": False,
    "syntax": True,
}
# What docker 20.10.24's classic builder did here.
CLASSIC_CHECKED = {feature: feature in ("copy-chown", "syntax") for feature in BUILDAH_1_28_CHECKED}


def cannot(builder: Builder, uses: list[FeatureUse] = EVERYTHING) -> set[str]:
    return {gap.use.feature for gap in missing(builder, uses)}


def test_the_table_agrees_with_what_buildah_1_28_did_here() -> None:
    refused = cannot(Builder("buildah", "1.28.2"))
    for feature, built in BUILDAH_1_28_CHECKED.items():
        assert (feature not in refused) == built, feature


def test_the_table_agrees_with_what_dockers_classic_builder_did_here() -> None:
    refused = cannot(Builder("docker", "20.10.24"))
    for feature, built in CLASSIC_CHECKED.items():
        assert (feature not in refused) == built, feature
    assert cannot(Builder("docker", "28.2.2")) == refused  # farm runs the classic builder always


@pytest.mark.parametrize(
    ("version", "now_runs"),
    [
        ("1.30.0", {"run-network", "run-network-host"}),
        ("1.31.1", {"mount-required-bare"}),
        ("1.33.0", {"heredoc-run", "heredoc-copy", "add-checksum"}),
        ("1.37.0", {"expansion-patterns"}),
        ("1.38.0", {"copy-exclude", "add-git"}),
        ("1.39.0", {"mount-cache-from-image"}),
        ("1.40.0", {"copy-parents"}),
        ("1.41.0", {"copy-link"}),
        ("1.44.0", {"mount-secret-env"}),
    ],
)
def test_each_buildah_release_adds_what_its_changelog_says(version: str, now_runs: set[str]) -> None:
    before = version.split(".")
    previous = f"{before[0]}.{int(before[1]) - 1}.9"
    assert cannot(Builder("buildah", previous)) - cannot(Builder("buildah", version)) == now_runs


def test_what_no_buildah_runs() -> None:
    assert cannot(Builder("buildah", "1.44.0")) == {
        "add-keep-git-dir",
        "add-unpack",
        "run-security",
        "run-device",
        "mount-tmpfs-size",
    }
    assert cannot(Builder("buildah", "2.0")) == cannot(Builder("buildah", "1.44.0"))


@pytest.mark.parametrize(
    ("podman", "buildah"),
    [
        ("4.3.1", "1.28"),
        ("4.3.1+ds1", "1.28"),
        ("4.9.4", "1.33"),
        ("5.6.0-rc1", "1.41"),
        ("6.1.0", "1.43"),
        ("3.0.1", "1.19"),
    ],
)
def test_podman_runs_what_its_bundled_buildah_runs(podman: str, buildah: str) -> None:
    assert cannot(Builder("podman", podman)) == cannot(Builder("buildah", buildah))


def test_podman_older_than_the_table_is_taken_as_the_oldest_buildah() -> None:
    assert cannot(Builder("podman", "2.2.1")) == cannot(Builder("buildah", "1.0"))
    assert min(PODMAN_BUILDAH) == (3, 0)


@pytest.mark.parametrize(
    ("frontend", "refused"),
    [
        ("1.2", {"heredoc-run", "heredoc-copy", "copy-link", "run-network", "run-network-host"}),
        ("1.4", {"add-git", "add-keep-git-dir", "add-checksum"}),
        ("1.7.1", {"copy-parents", "copy-exclude", "mount-secret-env"}),
        ("1.7-labs", set()),
        ("1", {"run-device"}),
        ("latest", {"run-device"}),
        ("1-labs", set()),
    ],
)
def test_buildkit_runs_what_its_frontend_version_runs(frontend: str, refused: set[str]) -> None:
    gaps = cannot(Builder("buildkit", frontend), [use for use in EVERYTHING if use.feature != "syntax"])
    assert refused <= gaps
    if frontend in ("1", "latest", "1-labs"):
        assert gaps == refused
    if frontend == "1.7-labs":
        assert {"copy-parents", "copy-exclude"}.isdisjoint(gaps)


def test_a_syntax_directive_chooses_the_frontend_buildkit_runs() -> None:
    uses = detect_features("# syntax=docker/dockerfile:1.3\nFROM a\nRUN <<EOT\nx\nEOT\n")
    [gap] = missing(Builder("buildkit", "1.20"), uses)
    assert gap.use.feature == "heredoc-run"
    assert str(gap.builder) == "BuildKit (docker/dockerfile:1.3)"
    assert "# syntax=docker/dockerfile:1.3" in gap.remedy
    newer = detect_features("# syntax=docker/dockerfile:1\nFROM a\nRUN <<EOT\nx\nEOT\n")
    assert missing(Builder("buildkit", "1.2"), newer) == []
    # buildah and docker's classic builder ignore the directive.
    assert [g.use.feature for g in missing(Builder("buildah", "1.28.2"), newer)] == ["heredoc-run"]


def test_gaps_say_the_feature_the_line_the_builder_and_what_works() -> None:
    uses = detect_features(
        "FROM a\nCOPY --link a /b\nRUN --network=host --mount=type=tmpfs,target=/t,size=1m x\n"
    )
    gaps = {gap.use.feature: gap for gap in missing(Builder("buildah", "1.28.2"), uses)}
    assert (
        gaps["copy-link"].message
        == "line 2: COPY --link / ADD --link (COPY --link): buildah 1.28.2 cannot run it"
    )
    assert gaps["copy-link"].remedy == (
        "runs on buildah 1.41 or newer (podman 5.6 or newer); BuildKit with docker/dockerfile:1.4 or newer"
    )
    assert gaps["run-network-host"].remedy.endswith("(BuildKit must be allowed network.host)")
    assert gaps["mount-tmpfs-size"].remedy == "runs on BuildKit with docker/dockerfile:1.4 or newer"
    secret_env = missing(Builder("podman", "5.8.0"), [FeatureUse(3, "mount-secret-env", "env=A")])
    assert "buildah 1.44 or newer (no podman release yet)" in secret_env[0].remedy
    device = missing(Builder("buildah", "1.44"), [FeatureUse(1, "run-device", "--device=x")])
    assert device[0].remedy == (
        "runs on BuildKit with docker/dockerfile:1.14-labs or newer (BuildKit must be allowed device)"
    )
    assert str(Builder("docker", "20.10.24")) == "docker 20.10.24 (its classic builder)"


def test_an_unknown_builder_kind_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown builder kind"):
        missing(Builder("kaniko", "1.0"), EVERYTHING)  # type: ignore[arg-type]


def test_every_row_says_where_its_facts_come_from() -> None:
    for feature, support in FEATURES.items():
        assert support.evidence, feature
        assert (
            support.buildah is not None
            or support.buildkit is not None
            or support.labs is not None
            or not support.classic
        )
    lowerable = {feature for feature, support in FEATURES.items() if support.lowerable}
    assert lowerable == {"heredoc-run", "heredoc-copy", "copy-link"}


_VERSIONS = st.tuples(st.integers(1, 2), st.integers(0, 60), st.integers(0, 9))


@_SETTINGS
@given(_VERSIONS, _VERSIONS, st.lists(st.sampled_from(sorted(FEATURES)), max_size=8))
def test_a_newer_builder_never_runs_less(
    older: tuple[int, ...], newer: tuple[int, ...], features: list[str]
) -> None:
    if newer < older:
        older, newer = newer, older
    uses = [FeatureUse(line, feature, feature) for line, feature in enumerate(features, start=1)]
    for kind in ("buildah", "podman", "buildkit"):
        spelled_old = ".".join(map(str, older if kind != "podman" else (older[1] % 8, older[2])))
        spelled_new = ".".join(map(str, newer if kind != "podman" else (newer[1] % 8, newer[2])))
        old_gaps = cannot(Builder(kind, spelled_old), uses)  # type: ignore[arg-type]
        new_gaps = cannot(Builder(kind, spelled_new), uses)  # type: ignore[arg-type]
        if kind == "podman" and (older[1] % 8, older[2]) > (newer[1] % 8, newer[2]):
            old_gaps, new_gaps = new_gaps, old_gaps
        assert new_gaps <= old_gaps
