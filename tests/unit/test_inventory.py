"""farm.inventory: node inventories validated, with errors naming the file, the node and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import InputError, InventoryError
from farm.inventory import Inventory, JumpHop, NodeSpec, load_inventory, parse_inventory
from farm.platforms import Platform

SOURCE = "lab/inventory.yaml"


def parse(text: str) -> Inventory:
    return parse_inventory(text, SOURCE)


def error_of(text: str) -> InventoryError:
    with pytest.raises(InventoryError) as caught:
        parse(text)
    assert caught.value.message.startswith(SOURCE)
    return caught.value


def test_a_local_node_gets_the_defaults() -> None:
    inventory = parse("nodes:\n  - name: local\n    local: true\n")
    assert inventory.source == SOURCE
    [node] = inventory.nodes
    assert node == NodeSpec(name="local", local=True)
    # No port: SSH's own default (22, or what ~/.ssh/config says).
    assert (node.host, node.port, node.slots, node.emulation, node.builder) == (None, None, 1, True, "auto")
    assert node.platforms is None
    assert node.labels == {}


def test_a_remote_node_with_every_field() -> None:
    text = """
nodes:
  - name: pi4
    host: 192.0.2.10
    port: 2222
    user: farm
    identity_file: ~/.ssh/farm
    known_hosts: /etc/farm/known_hosts
    proxy_jump: bastion.example.com
    platforms: [aarch64, linux/arm/v7, armhf]
    emulation: false
    slots: 2
    builder: podman
    workdir: /srv/farm
    labels: {rack: "3"}
"""
    [node] = parse(text).nodes
    assert node.host == "192.0.2.10"
    assert node.port == 2222
    assert node.identity_file == Path("~/.ssh/farm")
    assert node.platforms == (
        Platform("linux", "arm64"),
        Platform("linux", "arm", "v7"),
        Platform("linux", "arm", "v7"),
    )
    assert (node.emulation, node.slots, node.builder, node.workdir) == (False, 2, "podman", "/srv/farm")
    assert node.labels == {"rack": "3"}
    assert node.agent_workdir() == "/srv/farm"


def test_platforms_may_be_a_single_string() -> None:
    [node] = parse("nodes:\n  - {name: a, host: h, platforms: x86_64}\n").nodes
    assert node.platforms == (Platform("linux", "amd64"),)


def test_defaults_apply_to_every_node_and_nodes_override_them() -> None:
    text = """
defaults:
  user: farm
  slots: 4
  emulation: false
nodes:
  - {name: a, host: a.example.com}
  - {name: b, host: b.example.com, slots: 1, emulation: true}
"""
    a, b = parse(text).nodes
    assert (a.user, a.slots, a.emulation) == ("farm", 4, False)
    assert (b.user, b.slots, b.emulation) == ("farm", 1, True)


def test_empty_defaults_are_allowed() -> None:
    assert len(parse("defaults:\nnodes:\n  - {name: a, local: true}\n").nodes) == 1


def test_node_lookup() -> None:
    inventory = parse("nodes:\n  - {name: a, local: true}\n  - {name: b, host: h}\n")
    assert inventory.node("b").host == "h"
    with pytest.raises(KeyError):
        inventory.node("c")


def test_names_are_unique() -> None:
    error = error_of("nodes:\n  - {name: pi, host: a}\n  - {name: x, host: b}\n  - {name: pi, host: c}\n")
    assert "two nodes are named 'pi'" in error.message
    assert isinstance(error, InputError)
    assert error.exit_code == 2


@pytest.mark.parametrize(
    "node",
    [
        "{name: a}",
        "{name: a, local: false}",
        "{name: a, local: true, host: h}",
        "{name: a, host: ''}",
    ],
)
def test_a_node_is_local_or_has_a_host(node: str) -> None:
    error = error_of(f"nodes:\n  - {node}\n")
    assert f"{SOURCE}: node 'a': a node has either 'local: true' or a 'host'" in error.message


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("port", "0", "greater than or equal to 1"),
        ("port", "65536", "less than or equal to 65535"),
        ("port", "ssh", "valid integer"),
        ("slots", "0", "greater than or equal to 1"),
        ("slots", "257", "less than or equal to 256"),
        ("builder", "kaniko", "'auto', 'buildah', 'docker' or 'podman'"),
        ("emulation", "maybe", "valid boolean"),
        ("platforms", "[linux/vax]", "unknown platform 'linux/vax'"),
        ("platforms", "{os: linux}", "platforms is a list"),
        ("labels", "[a]", "valid dictionary"),
        ("colour", "red", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_names_the_file_the_node_and_the_field(field: str, value: str, complaint: str) -> None:
    error = error_of(f"nodes:\n  - name: ok\n    host: h\n  - name: pi4\n    host: h\n    {field}: {value}\n")
    assert error.message.startswith(f"{SOURCE}: node 'pi4': field {field}: ")
    assert complaint in error.message
    # One problem, one complaint: nothing about the node list itself.
    assert error.message.count(SOURCE) == 1


def test_a_lone_bad_node_gets_one_complaint() -> None:
    # Nothing about the node list being empty when the only node is merely invalid.
    error = error_of("nodes:\n  - {name: pi4, host: h, port: 0}\n")
    assert error.message == f"{SOURCE}: node 'pi4': field port: Input should be greater than or equal to 1"


@pytest.mark.parametrize("name", ["-pi", "pi 4", "pi/4", "a" * 64, "", "π"])
def test_node_names_are_checked(name: str) -> None:
    error = error_of(f'nodes:\n  - {{name: "{name}", host: h}}\n')
    assert "field name: a node name is letters, digits" in error.message


def test_a_node_without_a_name_is_numbered() -> None:
    error = error_of("nodes:\n  - {name: a, local: true}\n  - {host: h}\n")
    assert f"{SOURCE}: node #2: field name: Field required" in error.message


def test_a_node_that_is_not_a_mapping_is_numbered() -> None:
    error = error_of("nodes:\n  - pi4\n")
    assert f"{SOURCE}: node #1: " in error.message


def test_a_bad_default_is_reported_for_each_node() -> None:
    error = error_of("defaults: {slots: 0}\nnodes:\n  - {name: a, local: true}\n  - {name: b, host: h}\n")
    assert "node 'a': field slots" in error.message
    assert "node 'b': field slots" in error.message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("nodes: [", "not valid YAML"),
        ("", "expected a mapping with a 'nodes' list"),
        ("- name: a\n", "expected a mapping with a 'nodes' list"),
        ("nodes: []\n", "'nodes' must be a non-empty list"),
        ("defaults: {}\n", "'nodes' must be a non-empty list"),
        ("nodes: {name: a}\n", "'nodes' must be a non-empty list"),
        ("defaults: [a]\nnodes:\n  - {name: a, local: true}\n", "'defaults' must be a mapping"),
    ],
)
def test_bad_documents(text: str, complaint: str) -> None:
    assert complaint in error_of(text).message


def test_unknown_top_level_keys_are_named_with_a_hint() -> None:
    error = error_of("nodes:\n  - {name: a, local: true}\nnode: {}\nextra: 1\n")
    assert "unknown top-level key(s): extra, node" in error.message
    assert error.hint
    assert "'nodes'" in error.hint


def test_an_empty_inventory_built_directly_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        Inventory(nodes=())


def test_specs_are_frozen() -> None:
    [node] = parse("nodes:\n  - {name: a, local: true}\n").nodes
    with pytest.raises(ValueError, match="frozen"):
        node.slots = 3  # type: ignore[misc]


def test_agent_workdir_defaults() -> None:
    remote = NodeSpec(name="pi", host="h")
    local = NodeSpec(name="here", local=True)
    assert remote.agent_workdir() == ".cache/farm-agent"
    assert local.agent_workdir() == "~/.cache/farm-agent/nodes/here"


def test_the_embedded_default_inventory_loads() -> None:
    inventory = load_inventory(None)
    [node] = inventory.nodes
    assert node.name == "local"
    assert node.local
    assert node.host is None
    assert node.slots >= 1
    assert node.emulation
    assert inventory.source.startswith("<embedded ")


def test_load_inventory_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "farm.yaml"
    path.write_text("nodes:\n  - {name: a, host: h, slots: 0}\n")
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert caught.value.message.startswith(f"{path}: node 'a': field slots")


def test_load_inventory_of_a_missing_file_hints_how_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "missing.yaml")
    assert "missing.yaml" in caught.value.message
    assert caught.value.hint
    assert "--inventory" in caught.value.hint


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "inventory").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_inventory_loads(path: Path) -> None:
    inventory = load_inventory(path)
    assert inventory.nodes


def test_no_bastion_means_no_hops() -> None:
    assert NodeSpec(name="pi", host="10.0.0.2").jump_hops == ()
    assert NodeSpec(name="pi", host="10.0.0.2", proxy_jump="").proxy_jump is None


@pytest.mark.parametrize(
    ("text", "hops"),
    [
        ("bastion", (JumpHop("bastion"),)),
        ("ops@bastion:2222", (JumpHop("bastion", 2222, "ops"),)),
        ("a, me@b:22", (JumpHop("a"), JumpHop("b", 22, "me"))),
        ("user@corp@gw", (JumpHop("gw", None, "user@corp"),)),
    ],
)
def test_bastions_are_hops_in_the_order_they_are_passed(text: str, hops: tuple[JumpHop, ...]) -> None:
    assert NodeSpec(name="pi", host="10.0.0.2", proxy_jump=text).jump_hops == hops


@pytest.mark.parametrize("text", ["ops@", "@gw", "bastion:ssh", "gw:0", "gw:70000", "a,,b", ":22"])
def test_a_malformed_bastion_is_an_inventory_error_naming_the_node_and_field(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(f"nodes:\n  - name: z\n    host: z.internal\n    proxy_jump: {text!r}\n")
    with pytest.raises(InputError) as caught:
        load_inventory(path)
    assert str(path) in caught.value.message
    assert "node 'z'" in caught.value.message
    assert "proxy_jump" in caught.value.message
    assert "is not [user@]host[:port]" in caught.value.message
