"""farm.platforms: containerd's spellings, normalised; anything else refused with the valid list."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import InputError, PlatformError
from farm.platforms import (
    KNOWN_PLATFORMS,
    Platform,
    normalize,
    parse_platform,
    parse_platform_list,
    platform_from_machine,
)

_SETTINGS = settings(database=None, deadline=None)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
ARM_V6 = Platform("linux", "arm", "v6")
I386 = Platform("linux", "386")

# Every way of writing each known platform that containerd's rules accept.
SPELLINGS: dict[Platform, tuple[str, ...]] = {
    AMD64: ("linux/amd64", "amd64", "x86_64", "linux/x86_64", "linux/x86-64", "linux/amd64/v1"),
    ARM64: ("linux/arm64", "arm64", "aarch64", "linux/aarch64", "linux/arm64/v8", "linux/aarch64/v8"),
    ARM_V7: ("linux/arm/v7", "linux/arm", "arm", "armhf", "linux/armhf", "linux/arm/7", "armv7l"),
    ARM_V6: ("linux/arm/v6", "linux/arm/6", "armel", "linux/armel", "armv6l"),
    Platform("linux", "arm", "v5"): ("linux/arm/v5", "linux/arm/5", "armv5l"),
    I386: ("linux/386", "386", "i386", "i686", "linux/i386"),
    Platform("linux", "s390x"): ("linux/s390x", "s390x"),
    Platform("linux", "ppc64le"): ("linux/ppc64le", "ppc64le", "ppc64el"),
    Platform("linux", "riscv64"): ("linux/riscv64", "riscv64"),
    Platform("linux", "mips64le"): ("linux/mips64le", "mips64el"),
    Platform("linux", "loong64"): ("linux/loong64", "loongarch64"),
}

VALID_SPELLINGS = [(text, platform) for platform, texts in SPELLINGS.items() for text in texts]

MALFORMED = [
    "",
    "   ",
    "/",
    "linux/",
    "/amd64",
    "linux//amd64",
    "linux/arm/v7/extra",
    "linux/arm/",
    "linux/amd 64",
]

UNKNOWN = [
    "sparc64",
    "linux/sparc64",
    "windows/amd64",
    "darwin/arm64",
    "linux/arm/v8",  # 32-bit arm has no v8 platform
    "linux/arm64/v9",
    "linux/amd64/v3",
    "linux/386/v2",
    "linux/armhf/v6",  # armhf is v7 by definition
    "linux/armel/v7",
    "linux/x86_64/v2",
    "linux",  # containerd reads a bare OS as "this machine's arch"; farm needs an arch
]


def test_every_known_platform_is_covered_by_the_spelling_table() -> None:
    assert set(SPELLINGS) == set(KNOWN_PLATFORMS)


@pytest.mark.parametrize(("text", "expected"), VALID_SPELLINGS)
def test_spellings_normalise_like_containerd(text: str, expected: Platform) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize("platform", KNOWN_PLATFORMS, ids=str)
def test_canonical_string_round_trips(platform: Platform) -> None:
    assert parse_platform(str(platform)) == platform


def test_string_form() -> None:
    assert str(ARM_V7) == "linux/arm/v7"
    assert str(AMD64) == "linux/amd64"


@_SETTINGS
@given(st.sampled_from(VALID_SPELLINGS), st.data(), st.sampled_from(["", " ", "\t", "  \n"]))
def test_spellings_ignore_case_and_surrounding_space(
    case: tuple[str, Platform], data: st.DataObject, pad: str
) -> None:
    text, expected = case
    upper = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    mixed = "".join(c.upper() if flip else c for c, flip in zip(text, upper, strict=True))
    assert parse_platform(f"{pad}{mixed}{pad}") == expected


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_spellings_are_refused_with_the_valid_list(text: str) -> None:
    with pytest.raises(PlatformError) as caught:
        parse_platform(text)
    _assert_lists_valid_spellings(caught.value)


@pytest.mark.parametrize("text", UNKNOWN)
def test_unknown_platforms_are_refused_with_the_valid_list(text: str) -> None:
    with pytest.raises(PlatformError) as caught:
        parse_platform(text)
    assert text.split("/")[-1].lower() in caught.value.message.lower()
    _assert_lists_valid_spellings(caught.value)


def test_platform_errors_are_input_errors() -> None:
    with pytest.raises(InputError) as caught:
        parse_platform("linux/vax")
    assert caught.value.exit_code == 2


@_SETTINGS
@given(st.text(max_size=30))
def test_any_text_parses_to_a_known_platform_or_raises_platform_error(text: str) -> None:
    error: PlatformError | None = None
    try:
        platform = parse_platform(text)
    except PlatformError as exc:
        error = exc
    if error is None:
        assert platform in KNOWN_PLATFORMS
    else:
        _assert_lists_valid_spellings(error)


def test_list_keeps_order_and_drops_repeats() -> None:
    values = ["linux/arm64,linux/amd64", "aarch64", "linux/arm/v7", "armhf,x86_64", "linux/arm"]
    assert parse_platform_list(values) == [ARM64, AMD64, ARM_V7]


def test_list_accepts_spaces_after_commas() -> None:
    assert parse_platform_list(["linux/amd64, linux/arm64"]) == [AMD64, ARM64]


def test_empty_list_is_empty() -> None:
    assert parse_platform_list([]) == []
    assert parse_platform_list(()) == []


@pytest.mark.parametrize("value", ["linux/amd64,", ",linux/amd64", "linux/amd64,,linux/arm64", " ", ""])
def test_list_refuses_empty_items(value: str) -> None:
    with pytest.raises(PlatformError) as caught:
        parse_platform_list([value])
    _assert_lists_valid_spellings(caught.value)


def test_list_refuses_a_bad_item_anywhere() -> None:
    with pytest.raises(PlatformError, match="sparc"):
        parse_platform_list(["linux/amd64", "linux/arm64,linux/sparc"])


@_SETTINGS
@given(st.lists(st.sampled_from(VALID_SPELLINGS), max_size=12), st.data())
def test_list_is_the_ordered_set_of_its_items(items: list[tuple[str, Platform]], data: st.DataObject) -> None:
    # Group the spellings into comma-separated values at random cut points.
    values: list[str] = []
    for text, _ in items:
        if values and data.draw(st.booleans()):
            values[-1] += "," + text
        else:
            values.append(text)
    expected = list(dict.fromkeys(platform for _, platform in items))
    assert parse_platform_list(values) == expected


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", AMD64),
        ("aarch64", ARM64),
        ("armv7l", ARM_V7),
        ("armv6l", ARM_V6),
        ("i686", I386),
        ("s390x", Platform("linux", "s390x")),
        ("ppc64le", Platform("linux", "ppc64le")),
        ("riscv64", Platform("linux", "riscv64")),
        ("mips64", None),
        ("sparc64", None),
    ],
)
def test_platform_from_uname_machine(machine: str, expected: Platform | None) -> None:
    if expected is None:
        with pytest.raises(PlatformError):
            platform_from_machine(machine)
    else:
        assert platform_from_machine(machine) == expected
        assert platform_from_machine(machine, "Linux") == expected


def test_platform_from_machine_refuses_other_systems() -> None:
    with pytest.raises(PlatformError):
        platform_from_machine("arm64", "darwin")


def test_normalize_applies_the_same_rules_to_parts() -> None:
    assert normalize("linux", "aarch64", "v8") == ARM64
    assert normalize("LINUX", "ARM", "") == ARM_V7
    assert normalize("linux", "arm", "7") == ARM_V7
    assert normalize("linux", "x86_64", "v1") == AMD64
    with pytest.raises(PlatformError):
        normalize("linux", "armhf", "v6")


def test_descriptor_is_the_index_platform_object() -> None:
    assert AMD64.descriptor() == {"architecture": "amd64", "os": "linux"}
    assert ARM_V7.descriptor() == {"architecture": "arm", "os": "linux", "variant": "v7"}


def test_build_args_are_buildkits_names() -> None:
    assert ARM_V7.build_args("TARGET") == {
        "TARGETPLATFORM": "linux/arm/v7",
        "TARGETOS": "linux",
        "TARGETARCH": "arm",
        "TARGETVARIANT": "v7",
    }
    assert AMD64.build_args("BUILD") == {
        "BUILDPLATFORM": "linux/amd64",
        "BUILDOS": "linux",
        "BUILDARCH": "amd64",
        "BUILDVARIANT": "",
    }


@pytest.mark.parametrize(
    ("platform", "handler"),
    [
        (ARM64, "aarch64"),
        (ARM_V7, "arm"),
        (ARM_V6, "arm"),
        (AMD64, "x86_64"),
        (I386, "i386"),
        (Platform("linux", "mips64le"), "mips64el"),
        (Platform("linux", "loong64"), "loongarch64"),
        (Platform("linux", "s390x"), "s390x"),
    ],
)
def test_emulator_name_is_qemus_binfmt_handler(platform: Platform, handler: str) -> None:
    assert platform.emulator_name == handler


def test_platforms_are_hashable_and_ordered() -> None:
    assert len({AMD64, parse_platform("x86_64"), ARM64}) == 2
    assert sorted([ARM64, AMD64, ARM_V7]) == [AMD64, ARM_V7, ARM64]


def _assert_lists_valid_spellings(error: PlatformError) -> None:
    assert error.hint is not None, f"no hint for {error.message!r}"
    for platform in KNOWN_PLATFORMS:
        assert str(platform) in error.hint
    assert "aarch64" in error.hint
