"""farm.registry.verify's checks, on what was read: an image config and its layers' ELF scans."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from farm.errors import VerificationError
from farm.platforms import Platform
from farm.registry.name import parse_reference
from farm.registry.verify import LayerScan, check_config, check_executables, inspectable_layers

REF = parse_reference("registry.lab:5000/team/app@sha256:" + "a" * 64)
ARM64 = Platform("linux", "arm64")


def config(**fields: str) -> bytes:
    return json.dumps({"rootfs": {"type": "layers"}, **fields}).encode()


def scan(**architectures: int) -> LayerScan:
    return LayerScan(Counter(architectures), {arch: f"bin/{arch}-tool" for arch in architectures})


def test_a_config_naming_the_platform_passes_in_any_spelling() -> None:
    check_config(config(os="linux", architecture="aarch64"), ARM64, REF)
    check_config(config(os="linux", architecture="arm", variant="v7"), Platform("linux", "arm", "v7"), REF)


def test_a_config_naming_another_platform_is_refused_with_both_named() -> None:
    with pytest.raises(VerificationError) as caught:
        check_config(config(os="linux", architecture="amd64"), ARM64, REF)
    assert (
        caught.value.message
        == f"the image built for linux/arm64 says it is linux/amd64 in its config ({REF})"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[1, 2]", "is not a JSON object"),
        (b"\x1f\x8b not JSON at all", "is not a JSON object"),
        (config(os="linux", architecture="vax"), "has an image config with"),
    ],
)
def test_a_config_farm_cannot_read_a_platform_from_is_refused(raw: bytes, expected: str) -> None:
    with pytest.raises(VerificationError, match=expected):
        check_config(raw, ARM64, REF)


def test_executables_of_the_platform_pass_and_layers_without_any_do_not_matter() -> None:
    check_executables(ARM64, ["base", "empty"], {"base": scan(arm64=3), "empty": scan()})


def test_foreign_executables_are_counted_over_every_layer_that_lists_them_and_named() -> None:
    scans = {"base": scan(arm64=3, amd64=1), "tools": scan(amd64=2, s390x=1)}
    with pytest.raises(VerificationError) as caught:
        check_executables(ARM64, ["base", "tools", "tools"], scans)
    assert caught.value.message == (
        "the image built for linux/arm64 holds executables of another architecture: "
        "5 amd64 (e.g. /bin/amd64-tool), 2 s390x (e.g. /bin/s390x-tool)"
    )
    assert caught.value.hint


def test_zstd_layers_are_left_out_of_the_scan_and_order_and_repeats_are_kept() -> None:
    document = {
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:1"},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": "sha256:2"},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:3"},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:1"},
        ]
    }
    assert inspectable_layers(document) == ["sha256:1", "sha256:3", "sha256:1"]
