"""farm.registry.name: references parsed with docker's rules (distribution/reference)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import InputError, ReferenceError_
from farm.registry.name import DOCKER_HUB, Reference, is_loopback_host, parse_reference

_SETTINGS = settings(database=None, deadline=None, max_examples=50)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        # Docker Hub: official images get library/, user images do not.
        ("alpine", DOCKER_HUB, "library/alpine", "latest", ""),
        ("alpine:3.20", DOCKER_HUB, "library/alpine", "3.20", ""),
        ("team/app", DOCKER_HUB, "team/app", "latest", ""),
        ("team/app/sub:v1", DOCKER_HUB, "team/app/sub", "v1", ""),
        ("docker.io/alpine", DOCKER_HUB, "library/alpine", "latest", ""),
        ("docker.io/library/alpine:edge", DOCKER_HUB, "library/alpine", "edge", ""),
        ("index.docker.io/alpine", DOCKER_HUB, "library/alpine", "latest", ""),
        # A first part is a registry only with '.', ':' or when it is localhost.
        ("localhost/app", "localhost", "app", "latest", ""),
        ("localhost:5000/team/app:1.2", "localhost:5000", "team/app", "1.2", ""),
        ("registry.example.com/app", "registry.example.com", "app", "latest", ""),
        ("registry:5000/app", "registry:5000", "app", "latest", ""),
        ("127.0.0.1:5000/app:dev", "127.0.0.1:5000", "app", "dev", ""),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", ""),
        ("Registry.Example.com/app", "Registry.Example.com", "app", "latest", ""),
        ("example/app", DOCKER_HUB, "example/app", "latest", ""),
        # Without a slash, "localhost:5000" is repository "localhost" with tag "5000", as in docker.
        ("localhost:5000", DOCKER_HUB, "library/localhost", "5000", ""),
        ("localhost", DOCKER_HUB, "library/localhost", "latest", ""),
        # Digests: no default tag when a digest is given; a tag and a digest may both be given.
        (f"alpine@{DIGEST}", DOCKER_HUB, "library/alpine", "", DIGEST),
        (f"localhost:5000/app:1@{DIGEST}", "localhost:5000", "app", "1", DIGEST),
        # Separators allowed inside repository components.
        ("a_b__c-d--e/f.g", DOCKER_HUB, "a_b__c-d--e/f.g", "latest", ""),
        ("a.b", DOCKER_HUB, "library/a.b", "latest", ""),
        ("app:_under", DOCKER_HUB, "library/app", "_under", ""),
        ("app:" + "t" * 128, DOCKER_HUB, "library/app", "t" * 128, ""),
    ],
)
def test_parse(text: str, registry: str, repository: str, tag: str, digest: str) -> None:
    assert parse_reference(text) == Reference(registry, repository, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " alpine",
        "alpine ",
        "alp ine",
        "Alpine",  # repositories are lowercase
        "team/App",
        "localhost:5000/App",
        "alpine:",
        "alpine:.hidden",
        "alpine:-dash",
        "alpine:a/b",
        "alpine:" + "t" * 129,
        ":tag",
        "/alpine",
        "alpine/",
        "team//app",
        "-app",
        "app-",
        "a..b",
        "a___b",
        "registry.example.com/",
        "registry.example.com:port/app",
        "-bad.example.com/app",
        "alpine@sha256:abc",
        "alpine@sha256:" + "AB" * 32,
        "alpine@md5:" + "ab" * 16,
        f"alpine@{DIGEST}@{DIGEST}",
        "registry.example.com/" + "a" * 255,
    ],
)
def test_invalid_references_are_refused(text: str) -> None:
    with pytest.raises(ReferenceError_):
        parse_reference(text)


def test_invalid_tag_names_the_tag_and_hints_the_rule() -> None:
    with pytest.raises(ReferenceError_) as caught:
        parse_reference("app:-x")
    assert "'-x'" in caught.value.message
    assert caught.value.hint
    assert "128" in caught.value.hint
    assert isinstance(caught.value, InputError)


def test_uppercase_repository_hints_lowercase() -> None:
    with pytest.raises(ReferenceError_) as caught:
        parse_reference("localhost:5000/MyApp")
    assert caught.value.hint
    assert "lowercase" in caught.value.hint


def test_name_length_limit_counts_the_registry() -> None:
    registry = "r.example.com"
    fits = "a" * (255 - len(registry) - 1)
    assert parse_reference(f"{registry}/{fits}").repository == fits
    with pytest.raises(ReferenceError_, match="255"):
        parse_reference(f"{registry}/{fits}a")


def test_default_tag_is_configurable() -> None:
    assert parse_reference("alpine", default_tag="edge").tag == "edge"
    assert parse_reference(f"alpine@{DIGEST}", default_tag="edge").tag == ""


def test_reference_views() -> None:
    ref = parse_reference("localhost:5000/team/app:1.2")
    assert str(ref) == "localhost:5000/team/app:1.2"
    assert ref.name == "localhost:5000/team/app"
    assert ref.identifier == "1.2"
    assert ref.api_host == "localhost:5000"
    pinned = ref.with_digest(DIGEST)
    assert pinned == Reference("localhost:5000", "team/app", "", DIGEST)
    assert str(pinned) == f"localhost:5000/team/app@{DIGEST}"
    assert pinned.identifier == DIGEST
    assert pinned.with_tag("2") == Reference("localhost:5000", "team/app", "2", "")


def test_docker_hub_api_host_differs_from_its_name() -> None:
    ref = parse_reference("alpine")
    assert str(ref) == "docker.io/library/alpine:latest"
    assert ref.api_host == "registry-1.docker.io"


_COMPONENT = st.from_regex(re.compile(r"[a-z0-9]{1,4}(?:(?:\.|_|__|-+)[a-z0-9]{1,4}){0,2}"), fullmatch=True)
_TAG = st.from_regex(re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}"), fullmatch=True)
_REGISTRY = st.sampled_from(
    ["localhost", "localhost:5000", "registry.example.com", "r.io:443", "127.0.0.1:5000", "[::1]:5000"]
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = draw(_REGISTRY)
    repository = "/".join(draw(st.lists(_COMPONENT, min_size=1, max_size=3)))
    tag = draw(_TAG)
    digest = draw(st.one_of(st.just(""), st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True)))
    return Reference(registry, repository, tag, digest)


@_SETTINGS
@given(references())
def test_printed_reference_parses_back(ref: Reference) -> None:
    assert parse_reference(str(ref)) == ref


@_SETTINGS
@given(st.lists(_COMPONENT, min_size=1, max_size=3), _TAG)
def test_hub_references_are_normalised_once(parts: list[str], tag: str) -> None:
    # Docker Hub only when the first part cannot be a registry (no '.', no ':', not localhost).
    if len(parts) > 1 and ("." in parts[0] or parts[0] == "localhost"):
        parts[0] = parts[0].replace(".", "-") + "x"
    ref = parse_reference("/".join(parts) + ":" + tag)
    assert ref.registry == DOCKER_HUB
    assert ref.tag == tag
    name = "/".join(parts)
    assert ref.repository == (f"library/{name}" if len(parts) == 1 else name)
    # The normalised form parses to itself.
    assert parse_reference(str(ref)) == ref


@_SETTINGS
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_reference_error(text: str) -> None:
    try:
        ref = parse_reference(text)
    except ReferenceError_:
        return
    assert ref.repository == ref.repository.lower()
    assert ref.tag or ref.digest


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("registry.localhost:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3:80", True),
        ("[::1]:5000", True),
        ("[::1]", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("[::2]:5000", False),
        ("registry.example.com", False),
        ("localhost.example.com:5000", False),
        ("notlocalhost", False),
        ("docker.io", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
