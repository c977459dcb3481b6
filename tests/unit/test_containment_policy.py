"""farm.nodes.containment_problem: weaker containment than farm's default is never chosen silently."""

from __future__ import annotations

from typing import Any

import pytest

from farm.errors import InventoryError
from farm.inventory import NodeSpec, parse_inventory
from farm.nodefacts import NodeFacts
from farm.nodes import containment_problem
from farm.serve.app import refuse_local_nodes_sharing_the_server_user

CONTAINED: dict[str, Any] = {
    "machine": "x86_64",
    "python": "3.11.2",
    "cores": 4,
    "memory_bytes": 8 << 30,
    "disk_free_bytes": 64 << 30,
    "workdir": "/home/farm/.cache/farm-agent",
    "builders": ["buildah"],
    "emulators": [],
    "uid": 1001,
    "user": "farm",
    "oci_runtime": "/usr/sbin/runc",
    "private_network": True,
    "rootless_ready": True,
}


def problem(facts: dict[str, Any], **node: Any) -> str | None:
    spec = NodeSpec.model_validate({"name": "pi", "host": "pi.lab", **node})
    found = containment_problem(spec, NodeFacts.model_validate(CONTAINED | facts))
    return None if found is None else found.message


def test_an_unprivileged_rootless_node_with_runc_and_slirp4netns_is_fine() -> None:
    assert problem({}) is None


def test_an_agent_running_as_root_is_refused_unless_the_inventory_says_root() -> None:
    as_root = {"uid": 0, "user": "root"}
    assert (
        problem(as_root) == "pi: the agent runs as root there; a build that escapes its sandbox would be root"
    )
    assert problem(as_root, user="admin") is not None  # an alias that maps to root is not "on purpose"
    assert problem(as_root, user="root") is None


def test_no_runc_is_refused_unless_the_inventory_says_chroot() -> None:
    assert problem({"oci_runtime": ""}) == "pi: no OCI runtime (runc) there to sandbox RUN steps with"
    assert problem({"oci_runtime": ""}, isolation="chroot") is None


def test_no_private_network_and_no_subordinate_ids_are_refused() -> None:
    assert "no slirp4netns" in str(problem({"private_network": False}))
    assert "no subordinate uids and gids" in str(problem({"rootless_ready": False}))
    assert problem({"rootless_ready": False, "uid": 0}, user="root") is None  # root needs none


def test_a_docker_node_needs_neither_runc_nor_slirp4netns_of_its_own() -> None:
    # dockerd sandboxes RUN steps itself; its socket is root-equivalent, so such nodes say root.
    docker = {"builders": ["docker"], "oci_runtime": "", "private_network": False, "rootless_ready": False}
    assert problem(docker) is None


@pytest.mark.parametrize("isolation", ["none", "rootless", ""])
def test_an_unknown_isolation_is_an_inventory_error(isolation: str) -> None:
    with pytest.raises(ValueError, match="isolation"):
        NodeSpec.model_validate({"name": "pi", "host": "pi.lab", "isolation": isolation})


def test_a_server_refuses_a_local_node_that_would_build_as_its_own_user() -> None:
    """Its builds could read the server's token and credentials: configured on purpose, or not at all."""
    inventory = parse_inventory("nodes:\n  - name: local\n    local: true\n", "serve.yaml")
    with pytest.raises(
        InventoryError, match="its builds would run as farm, this server's own user"
    ) as refused:
        refuse_local_nodes_sharing_the_server_user(inventory, 998, "farm")
    assert refused.value.hint is not None
    assert "'user: farm'" in refused.value.hint
    refuse_local_nodes_sharing_the_server_user(inventory, 0, "root")  # root: the agent becomes farm-build
    on_purpose = parse_inventory("nodes:\n  - name: local\n    local: true\n    user: farm\n", "serve.yaml")
    refuse_local_nodes_sharing_the_server_user(on_purpose, 998, "farm")
