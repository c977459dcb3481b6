"""Node inventories: YAML files naming the machines farm may build on, validated with pydantic.

    defaults:            # optional: applied to every node, each node may override
      emulation: true
    nodes:
      - name: local
        local: true      # this machine, reached without SSH; its agent runs as farm-build
      - name: pi4
        host: 192.0.2.10
        user: farm
        platforms: [linux/arm64]
        slots: 1

Errors name the file, the node and the field. Pure apart from ``load_inventory`` reading a file.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.errors import InventoryError, PlatformError
from farm.platforms import Platform, parse_platform

__all__ = [
    "DEFAULT_INVENTORY",
    "Inventory",
    "NodeSpec",
    "append_node",
    "load_inventory",
    "parse_inventory",
    "remove_node",
]

DEFAULT_INVENTORY = "inventory/local.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class JumpHop:
    """One bastion on the way to a node, as ``ssh -J`` spells it: ``[user@]host[:port]``."""

    host: str
    port: int | None = None
    user: str | None = None


def parse_jump_hops(text: str) -> tuple[JumpHop, ...]:
    """Comma-separated bastions (``ssh -J``), in the order they are passed through."""
    hops = []
    for part in (part.strip() for part in text.split(",")):
        user, at, address = part.rpartition("@")
        host, _, port_text = address.partition(":")
        port = int(port_text) if port_text.isdigit() else None
        if not host or (at and not user) or (port_text and not (port and port <= 65535)):
            raise ValueError(f"{part!r} is not [user@]host[:port] (ssh -J's form, hops comma-separated)")
        hops.append(JumpHop(host, port, user or None))
    return tuple(hops)


class NodeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    local: bool = False
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535, description="22 unless ~/.ssh/config says")
    user: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    proxy_jump: str | None = None
    platforms: tuple[Platform, ...] | None = Field(
        default=None, description="native platforms as the operator states them; probed when absent"
    )
    emulation: bool = Field(default=True, description="may this node build foreign platforms under QEMU")
    slots: int = Field(default=1, ge=1, le=256, description="concurrent builds on this node")
    builder: Literal["auto", "buildah", "docker", "podman"] = "auto"
    speed: float = Field(default=1.0, gt=0, description="relative build speed: among equals, faster wins")
    workdir: str | None = Field(default=None, description="where the agent keeps its cache and builds")
    labels: dict[str, str] = Field(default_factory=dict)
    isolation: Literal["oci", "chroot"] = Field(
        default="oci",
        description="how RUN steps are kept from the node: an OCI sandbox (runc), or chroot, which "
        "is no sandbox and must be chosen on purpose",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a node name is letters, digits, '.', '_' or '-' (63 at most)")
        return value

    @field_validator("proxy_jump")
    @classmethod
    def _check_proxy_jump(cls, value: str | None) -> str | None:
        if value:
            parse_jump_hops(value)
        return value or None

    @field_validator("platforms", mode="before")
    @classmethod
    def _parse_platforms(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("platforms is a list such as [linux/arm64]")
        try:
            return tuple(item if isinstance(item, Platform) else parse_platform(str(item)) for item in value)
        except PlatformError as exc:
            raise ValueError(exc.message) from exc

    @model_validator(mode="after")
    def _local_or_host(self) -> NodeSpec:
        if self.local == bool(self.host):
            raise ValueError("a node has either 'local: true' or a 'host', not both and not neither")
        return self

    @property
    def jump_hops(self) -> tuple[JumpHop, ...]:
        return parse_jump_hops(self.proxy_jump) if self.proxy_jump else ()

    @property
    def root_on_purpose(self) -> bool:
        """The inventory says the agent runs as root here: its builds then run as root too."""
        return self.user == "root"

    def agent_workdir(self) -> str:
        """Where the agent keeps its cache and builds, in its own user's home unless set: a local
        node's agent runs as a user of its own too (see ``farm.transport.local``)."""
        if self.workdir:
            return self.workdir
        if self.local:
            return f"~/.cache/farm-agent/nodes/{self.name}"
        return ".cache/farm-agent"


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # At least one node, checked below rather than with min_length: pydantic reports a too-short
    # tuple for every inventory whose nodes fail validation, a confusing extra error.
    nodes: tuple[NodeSpec, ...]
    source: str = Field(default="<inline>", exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Inventory:
        if not self.nodes:
            raise ValueError("an inventory needs at least one node")
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"two nodes are named {node.name!r}")
            seen.add(node.name)
        return self

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def parse_inventory(text: str, source: str) -> Inventory:
    """Validate inventory YAML; ``source`` names the file in errors."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise InventoryError(f"{source}: expected a mapping with a 'nodes' list")
    unknown = set(document) - {"nodes", "defaults"}
    if unknown:
        raise InventoryError(
            f"{source}: unknown top-level key(s): {', '.join(sorted(unknown))}",
            hint="an inventory has 'nodes' and optionally 'defaults'",
        )
    defaults = document.get("defaults") or {}
    nodes = document.get("nodes")
    if not isinstance(defaults, dict):
        raise InventoryError(f"{source}: 'defaults' must be a mapping of node fields")
    if not isinstance(nodes, list) or not nodes:
        raise InventoryError(f"{source}: 'nodes' must be a non-empty list")
    merged = [{**defaults, **node} if isinstance(node, dict) else node for node in nodes]
    try:
        return Inventory(nodes=merged, source=source)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise InventoryError(_describe(exc, source, merged)) from exc


def load_inventory(path: Path | None) -> Inventory:
    """Load ``path``, or the embedded default inventory (this machine as one local node)."""
    if path is None:
        resource = importlib.resources.files("farm").joinpath("default_inventory.yaml")
        return parse_inventory(resource.read_text(), f"<embedded {DEFAULT_INVENTORY}>")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(
            f"cannot read inventory {path}: {exc.strerror}",
            hint="pass --inventory PATH or set FARM_INVENTORY",
        ) from exc
    return parse_inventory(text, str(path))


def _describe(exc: ValidationError, source: str, nodes: list[Any]) -> str:
    problems = []
    for error in exc.errors():
        location = list(error["loc"])
        where = source
        if location[:1] == ["nodes"] and len(location) > 1 and isinstance(location[1], int):
            index = location[1]
            node = nodes[index] if index < len(nodes) else None
            name = node.get("name") if isinstance(node, dict) else None
            where += f": node {name!r}" if name else f": node #{index + 1}"
            location = location[2:]
        field = ".".join(str(part) for part in location)
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}{': field ' + field if field else ''}: {message}")
    return "; ".join(problems)


def append_node(path: Path, node: dict[str, Any]) -> None:
    """Add a node to an inventory file, keeping the file's text (and comments) as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "nodes:\n"
    inventory = parse_inventory(text, str(path)) if text.strip() != "nodes:" else None
    if inventory is not None and any(existing.name == node["name"] for existing in inventory.nodes):
        raise InventoryError(f"{path}: there is already a node named {node['name']!r}")
    block = yaml.safe_dump([node], sort_keys=False, default_flow_style=False)
    indented = "".join(f"  {line}\n" for line in block.splitlines())
    updated = text if text.endswith("\n") else text + "\n"
    updated += indented
    parse_inventory(updated, str(path))  # never write an inventory that does not load
    _replace(path, updated)


def remove_node(path: Path, name: str) -> None:
    """Remove a node's block from an inventory file, keeping the rest of its text."""
    text = path.read_text(encoding="utf-8")
    inventory = parse_inventory(text, str(path))
    if all(node.name != name for node in inventory.nodes):
        raise InventoryError(f"{path}: no node named {name!r}", hint="see 'farm nodes ls'")
    lines = text.splitlines(keepends=True)
    start = next(
        (
            index
            for index, line in enumerate(lines)
            if re.match(rf"^\s*-\s+name:\s*['\"]?{re.escape(name)}['\"]?\s*(#.*)?$", line)
        ),
        None,
    )
    if start is None:
        raise InventoryError(f"{path}: cannot find where node {name!r} starts; edit the file by hand")
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines):
        line = lines[end]
        stripped = line.strip()
        if stripped and (len(line) - len(line.lstrip()) <= indent):
            break
        end += 1
    updated = "".join(lines[:start] + lines[end:])
    if len(parse_inventory(updated, str(path)).nodes) != len(inventory.nodes) - 1:
        raise InventoryError(f"{path}: could not remove {name!r} cleanly; edit the file by hand")
    _replace(path, updated)


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
