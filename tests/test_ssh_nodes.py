"""Nodes over SSH, on real OpenSSH sshd nodes in network namespaces (tests/sshlab.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.context import Context
from farm.errors import InputError
from farm.inventory import NodeSpec
from farm.session import open_session
from farm.transport.ssh import SshConnections, SshTransport
from tests import lab, sshlab
from tests.lab import processes_running

pytestmark = pytest.mark.lab

PLATFORMS = "linux/amd64,linux/arm64,linux/arm/v7,linux/s390x"


@pytest.fixture
def three(tmp_path: Path) -> Iterator[sshlab.SshLab]:
    with sshlab.ssh_lab(tmp_path, count=3) as running:
        yield running


@pytest.fixture
def lab_registry(tmp_path: Path, three: sshlab.SshLab) -> Iterator[lab.Registry]:
    """A registry the nodes reach: bound to the lab's bridge address."""
    with lab.running_registry(tmp_path / "registry", three.host_address) as registry:
        yield registry


def farm_build(registry: lab.Registry, inventory: Path, context: Path, tag: str, *extra: str) -> lab.FarmRun:
    return lab.farm(
        "build", "-t", f"{registry.host}/{tag}", "--insecure-registry", registry.host,
        "--inventory", str(inventory), "--progress", "plain", *extra, str(context),
    )  # fmt: skip


def sleeping_dockerfile(marker: str) -> str:
    """A RUN whose shell stays alive (it has a last command) with the marker on its command line."""
    return f"FROM BASE\nRUN echo started-{marker}; sleep 3600; echo {marker}\n"


def small_context(root: Path, registry: lab.Registry, dockerfile: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile.replace("BASE", f"{registry.host}/library/busybox"))
    return root


def test_build_across_three_nodes_gives_a_verified_index(
    tmp_path: Path, three: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    inventory = three.write_inventory(tmp_path / "inventory.yaml", slots=1)
    context = small_context(
        tmp_path / "ctx",
        lab_registry,
        "FROM BASE\nARG TARGETPLATFORM\nRUN echo $TARGETPLATFORM $(uname -m) > /built\nCMD cat /built\n",
    )
    metadata = tmp_path / "metadata.json"
    run = farm_build(lab_registry, inventory, context, "ssh/spread:1", "--platform", PLATFORMS,
                     "--metadata-file", str(metadata))  # fmt: skip
    assert run.code == 0, run.stderr
    placed = json.loads(metadata.read_text())["farm.platforms"]
    # Three single-slot nodes, four platforms: the work is spread over every node.
    assert {entry["node"] for entry in placed.values()} == {"node0", "node1", "node2"}
    index = lab_registry.raw_manifest("ssh/spread:1")
    assert [(m["platform"]["architecture"], m["digest"]) for m in index["manifests"]] == [  # type: ignore[index]
        (arch, placed[platform]["digest"])
        for arch, platform in zip(["amd64", "arm64", "arm", "s390x"], PLATFORMS.split(","), strict=True)
    ]
    # Each node kept the context in its own content store, and no build folder.
    for node in three.nodes:
        assert any((node.host_workdir / "cas" / "sha256").iterdir())
        assert list((node.host_workdir / "builds").iterdir()) == []


def test_nodes_check_reports_each_node(tmp_path: Path, three: sshlab.SshLab) -> None:
    inventory = three.write_inventory(tmp_path / "inventory.yaml")
    run = lab.farm("nodes", "check", "--json", "--inventory", str(inventory))
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert [node["name"] for node in report] == ["node0", "node1", "node2"]
    for node in report:
        assert node["usable"] is True
        assert "linux/amd64" in node["native"]
        assert "linux/arm64" in node["emulated"]
        assert node["facts"]["builders"][0] == "buildah"
        assert node["facts"]["python"].startswith("3.")


def test_a_changed_host_key_is_refused_naming_both_fingerprints(tmp_path: Path, three: sshlab.SshLab) -> None:
    inventory = three.write_inventory(tmp_path / "inventory.yaml")
    node = three.nodes[1]
    node.change_host_key()
    run = lab.farm("nodes", "check", "--inventory", str(inventory), "node1")
    assert run.code == 1
    assert f"the host key of {node.address} has CHANGED" in run.stderr
    assert run.stderr.count("SHA256:") == 2
    assert "refusing to connect" in run.stderr


def test_nodes_add_pins_a_new_key_and_refuses_a_changed_one(tmp_path: Path, three: sshlab.SshLab) -> None:
    node = three.nodes[0]
    inventory = tmp_path / "inventory.yaml"
    pinned = tmp_path / "known_hosts"
    add = [
        "nodes", "add", "pi", "--host", node.address, "--user", "root",
        "--identity-file", str(three.client_key), "--workdir", node.workdir,
        "--inventory", str(inventory), "--known-hosts", str(pinned),
    ]  # fmt: skip
    run = lab.farm(*add)
    assert run.code == 0, run.stderr
    assert f"{node.address} presents ssh-ed25519 key SHA256:" in run.stdout
    assert pinned.read_text().strip() == node.known_hosts_line
    assert lab.farm("nodes", "check", "--inventory", str(inventory)).code == 0

    node.change_host_key()
    again = lab.farm(*[arg if arg != "pi" else "pi2" for arg in add])
    assert again.code == 1
    assert "already has a different key" in again.stderr
    assert lab.farm("nodes", "check", "--inventory", str(inventory)).code == 1


def test_a_dead_node_is_found_when_its_link_is_cut_and_its_build_stops(
    tmp_path: Path, three: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    node = three.nodes[2]
    inventory = three.write_inventory(tmp_path / "inventory.yaml", [node])
    marker = f"farm-cut-{uuid.uuid4().hex[:8]}"
    context = small_context(tmp_path / "ctx", lab_registry, f"FROM BASE\n{lab.stuck_run(marker)}\n")
    farm = lab.start_farm(
        "build", "-t", f"{lab_registry.host}/ssh/cut:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64", "--progress", "plain", "--inventory", str(inventory), str(context),
    )  # fmt: skip
    try:
        lab.wait_started(farm, marker)
        assert processes_running(marker)
        node.cut_link()
        # Keepalives (every 5 s, 3 missed) tell the coordinator; the timeout only guards a hang.
        output, _ = farm.communicate(timeout=120)
    finally:
        farm.kill()
        farm.wait()
    assert farm.returncode == 1
    assert "lost the agent on node2" in output or "node2" in output
    assert lab_registry.tags("ssh/cut") == []
    # sshd notices the silent client too (ClientAliveInterval), which closes the agent's stdin:
    # the lifeline kills the build on the node.
    lab.wait_until(lambda: not processes_running(marker), "the cut-off node's build to be killed", 90)


def test_cancelling_a_build_leaves_no_process_on_any_node(
    tmp_path: Path, three: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    inventory = three.write_inventory(tmp_path / "inventory.yaml", slots=1)
    marker = f"farm-ssh-cancel-{uuid.uuid4().hex[:8]}"
    context = small_context(tmp_path / "ctx", lab_registry, f"FROM BASE\n{lab.stuck_run(marker)}\n")
    farm = lab.start_farm(
        "build", "-t", f"{lab_registry.host}/ssh/cancel:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64,linux/arm64,linux/s390x", "--progress", "plain",
        "--inventory", str(inventory), str(context),
    )  # fmt: skip
    try:
        lab.wait_started(farm, marker, count=3)
        farm.send_signal(signal.SIGTERM)
        farm.communicate(timeout=60)
    finally:
        farm.kill()
        farm.wait()
    lab.wait_until(lambda: not processes_running(marker), "every node's build to be killed", 30)
    for node in three.nodes:
        lab.wait_until(
            lambda n=node: not processes_running(n.workdir), f"the agent on {node.name} to exit", 30
        )  # type: ignore[misc]
        assert list((node.host_workdir / "builds").iterdir()) == []
    assert lab_registry.tags("ssh/cancel") == []


def test_a_coordinator_killed_mid_run_leaves_no_process_mount_or_container_on_the_node(
    tmp_path: Path, three: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    node = three.nodes[0]
    inventory = three.write_inventory(tmp_path / "inventory.yaml", [node])
    marker = f"farm-ssh-killed-{uuid.uuid4().hex[:8]}"
    context = small_context(tmp_path / "ctx", lab_registry, f"FROM BASE\n{lab.stuck_run(marker)}\n")
    farm = lab.start_farm(
        "build", "-t", f"{lab_registry.host}/ssh/killed:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64", "--progress", "plain", "--inventory", str(inventory), str(context),
    )  # fmt: skip
    try:
        lab.wait_started(farm, marker)
        assert processes_running(marker)
        farm.kill()  # SIGKILL: no goodbye to the agent, only its stdin closing
    finally:
        farm.kill()
        farm.wait()
    lab.wait_until(lambda: not processes_running(node.workdir), "the agent and its build to end", 60)
    mounted = [
        line
        for path in Path("/proc").glob("[0-9]*/mountinfo")
        for line in _read_lines(path)
        if node.workdir in line
    ]
    assert mounted == []
    containers = subprocess.run(
        [*lab.build_user_store(node.host_workdir), "containers", "--quiet"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert containers.stdout.split() == []
    assert list((node.host_workdir / "builds").iterdir()) == []


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:  # a process that ended while we looked
        return []


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (("../escape", stat.S_IFREG | 0o644, 1, "sha256:" + "0" * 64, ""), "'..'"),
        (("/etc/passwd", stat.S_IFREG | 0o644, 1, "sha256:" + "0" * 64, ""), "absolute"),
        (("link", stat.S_IFLNK | 0o777, 0, "", "../../etc"), "points outside the context"),
        (("link", stat.S_IFLNK | 0o777, 0, "", "/etc/shadow"), "points outside the context"),
        (("dev", stat.S_IFCHR | 0o600, 0, "", ""), "not a file, folder or link"),
    ],
)
def test_the_agent_refuses_hostile_context_entries(
    three: sshlab.SshLab, entry: tuple[str, int, int, str, str], reason: str
) -> None:
    """A coordinator gone wrong sends entries that would escape the build folder: refused."""
    from agent.protocol import canonical_manifest

    node = three.nodes[0]
    spec = NodeSpec.model_validate(node.inventory_entry())
    hostile = Context(
        root=Path("/nonexistent"), entries=(entry,), blobs={}, manifest=canonical_manifest([entry])
    )

    async def sync() -> None:
        connections = SshConnections()
        try:
            async with open_session(node.name, SshTransport(spec, connections), node.workdir) as session:
                await session.sync(hostile)
        finally:
            await connections.close()

    with pytest.raises(InputError, match=reason):
        asyncio.run(sync())
    assert not (Path(node.workdir) / "escape").exists()


@pytest.fixture(scope="session")
def arm64_box() -> Path:
    return sshlab.ensure_arm64_box()


@pytest.mark.timeout(900)  # builds the arm64 box on first use (minutes under QEMU)
def test_the_arm64_box_is_probed_as_arm64_and_builds_natively(tmp_path: Path, arm64_box: Path) -> None:
    with (
        sshlab.ssh_lab(tmp_path, count=0, arm64=1, box=arm64_box) as box_lab,
        lab.running_registry(tmp_path / "registry", box_lab.host_address) as registry,
    ):
        inventory = box_lab.write_inventory(tmp_path / "inventory.yaml")
        check = lab.farm("nodes", "check", "--json", "--inventory", str(inventory))
        assert check.code == 0, check.stderr
        (report,) = json.loads(check.stdout)
        assert report["native"] == ["linux/arm64"]
        assert report["facts"]["machine"] == "aarch64"

        # No RUN: nested emulation cannot run one; the cross-compiled-binary pattern needs none.
        context = small_context(
            tmp_path / "ctx", registry, "FROM BASE\nCOPY app.txt /app.txt\nCMD cat /app.txt\n"
        )
        (context / "app.txt").write_text("from the arm64 node\n")
        metadata = tmp_path / "metadata.json"
        run = farm_build(registry, inventory, context, "ssh/box:1", "--platform", "linux/arm64",
                         "--metadata-file", str(metadata))  # fmt: skip
        assert run.code == 0, run.stderr
        placed = json.loads(metadata.read_text())["farm.platforms"]["linux/arm64"]
        assert placed["node"] == box_lab.nodes[0].name
        assert placed["mode"] == "native"
        index = registry.raw_manifest("ssh/box:1")
        assert [m["platform"] for m in index["manifests"]] == [{"architecture": "arm64", "os": "linux"}]  # type: ignore[index]


def test_a_node_behind_a_bastion_is_reached_through_proxy_jump(tmp_path: Path) -> None:
    """The hidden node lets in only connections from the bastion: farm reaches it through the
    bastion, which it verifies and authenticates as it does the node itself."""
    with sshlab.ssh_lab(tmp_path, count=2) as two:
        bastion, hidden = two.nodes
        with hidden.sshd_config.open("a") as config:
            config.write(f"AllowUsers {lab.BUILD_USER}@{bastion.address}\n")
        hidden.restart_sshd()

        def check(name: str, **fields: object) -> dict[str, object]:
            inventory = lab.write_inventory(
                tmp_path / f"{name}.yaml", **{**hidden.inventory_entry(), **fields}
            )
            run = lab.farm("nodes", "check", "--json", "--inventory", str(inventory))
            (report,) = json.loads(run.stdout)
            assert run.code == (0 if report["usable"] else 1), run.stderr
            return report  # type: ignore[no-any-return]

        direct = check("direct", local=False)
        assert direct["usable"] is False
        assert f"{hidden.address} refused our key" in str(direct["problem"])

        jumped = check("jumped", local=False, proxy_jump=f"root@{bastion.address}")
        assert jumped["usable"] is True, jumped["problem"]
        assert f"Accepted publickey for {lab.BUILD_USER} from {bastion.address} " in hidden.log_tail(100_000)

        # Only the hidden node's key is trusted: the bastion's is not, so nothing goes through it.
        only_hidden = tmp_path / "only_hidden_known_hosts"
        only_hidden.write_text(hidden.known_hosts_line + "\n")
        unverified = check("unverified", local=False, proxy_jump=f"root@{bastion.address}:22",
                           known_hosts=str(only_hidden))  # fmt: skip
        assert unverified["usable"] is False
        assert f"the host key of {bastion.address} (SHA256:" in str(unverified["problem"])
        assert "is not known" in str(unverified["problem"])


def test_ssh_config_host_aliases_users_and_keys_are_honoured(tmp_path: Path, three: sshlab.SshLab) -> None:
    """An inventory naming only a ~/.ssh/config alias reaches the node as that config says."""
    node = three.nodes[0]
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host shelf-pi\n  HostName {node.address}\n  User {lab.BUILD_USER}\n"
        f"  IdentityFile {three.client_key}\n"
    )
    (home / ".ssh" / "known_hosts").write_text(node.known_hosts_line + "\n")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"nodes:\n  - name: pi\n    host: shelf-pi\n    workdir: {node.workdir}\n")
    run = lab.farm("nodes", "check", "--json", "--inventory", str(inventory), env={"HOME": str(home)})
    assert run.code == 0, run.stderr
    (report,) = json.loads(run.stdout)
    assert report["usable"] is True
