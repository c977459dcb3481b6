"""Bastions as ``ssh -J`` spells them."""

from __future__ import annotations

import pytest

from farm.errors import NodeError
from farm.inventory import NodeSpec
from farm.transport.ssh import JumpHop, jump_hops


def _spec(proxy_jump: str | None) -> NodeSpec:
    return NodeSpec(name="pi", host="10.0.0.2", proxy_jump=proxy_jump)


def test_no_bastion() -> None:
    assert jump_hops(_spec(None)) == []
    assert jump_hops(_spec("")) == []


@pytest.mark.parametrize(
    ("text", "hops"),
    [
        ("bastion", [JumpHop("bastion")]),
        ("ops@bastion:2222", [JumpHop("bastion", 2222, "ops")]),
        ("a, me@b:22", [JumpHop("a"), JumpHop("b", 22, "me")]),
        ("user@corp@gw", [JumpHop("gw", None, "user@corp")]),
    ],
)
def test_hops_in_the_order_they_are_passed(text: str, hops: list[JumpHop]) -> None:
    assert jump_hops(_spec(text)) == hops


@pytest.mark.parametrize("text", ["ops@", "bastion:ssh", "a,,b", ":22"])
def test_a_malformed_jump_names_the_node_and_the_hop(text: str) -> None:
    with pytest.raises(NodeError, match=r"^pi: proxy_jump .* is not \[user@\]host\[:port\]"):
        jump_hops(_spec(text))
