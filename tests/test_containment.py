"""A Dockerfile's RUN step stays in its sandbox: hostile builds on the local node, on an SSH node and
through ``farm serve`` try to escape their root, read host files and the server's secrets, see and
read other processes (other builds' too), write into the agent's cache and reach loopback services.

The attacker is ``tests/hostile/probe.c`` (see ``tests/hostile.py``); each test reads the verdicts
from the build's own output and checks that nothing changed on the host.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import hostile, lab, sshlab
from tests.servelab import Server, start_server

pytestmark = pytest.mark.lab


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile.compile_probe(tmp_path_factory.mktemp("probe"))


def build_output(run: lab.FarmRun) -> str:
    return run.stdout + run.stderr


def assert_untouched(watch: hostile.Watch) -> None:
    assert watch.changed() == [], "the build changed files on the host"
    assert watch.written() == [], "the build wrote into the agent's cache folder"


def assert_agent_cache_aimed_at(folders: list[Path]) -> None:
    """The probe tried to write where the node really keeps its agent (else it proves nothing)."""
    assert any(any(folder.glob("farm-agent-*.pyz")) for folder in folders), (
        f"no cached agent zipapp in {[str(folder) for folder in folders]}: "
        "tests/hostile.py agent_cache_dirs() must name the folder the node keeps it in"
    )


@pytest.mark.timeout(300)
def test_a_hostile_build_on_the_local_node_is_contained(
    tmp_path: Path, registry: lab.Registry, inventory: Path, node_workdir: Path, probe: Path
) -> None:
    secret = secrets.token_hex(16)
    home = tmp_path / "home"  # the coordinator's home, with a docker credential in it
    config = hostile.docker_config(home, secret)
    canary = hostile.canary_file(tmp_path / "canary" / "secret.txt", secret)
    caches = hostile.agent_cache_dirs(home, node_workdir)
    with hostile.canary_process(secret) as port:
        aim = hostile.Aim(
            nonce=secrets.token_hex(8),
            secrets=[secret],
            canaries=[str(canary)],
            reads=[str(canary), str(config), *map(str, caches)],
            writes=[str(folder) for folder in caches],
            ports=[port, int(registry.host.rsplit(":", 1)[1])],
        )
        context = hostile.hostile_context(
            tmp_path / "ctx", f"{registry.host}/library/busybox:latest", probe, aim
        )
        watch = hostile.Watch([canary, config], caches)
        try:
            run = lab.farm(
                "build", "-t", f"{registry.host}/hostile/local:1", "--platform", "linux/amd64",
                "--progress", "plain", "--inventory", str(inventory), str(context),
                env={"HOME": str(home)},
            )  # fmt: skip
            assert run.code == 0, build_output(run)
            hostile.assert_contained(build_output(run))
            assert_untouched(watch)
            assert_agent_cache_aimed_at(caches)
        finally:
            watch.clean()


@pytest.mark.timeout(300)
def test_a_hostile_build_on_an_ssh_node_is_contained(tmp_path: Path, probe: Path) -> None:
    with (
        sshlab.ssh_lab(tmp_path, count=1) as one,
        lab.running_registry(tmp_path / "registry", one.host_address) as registry,
    ):
        node = one.nodes[0]
        inventory = one.write_inventory(tmp_path / "inventory.yaml")
        secret = secrets.token_hex(16)
        canary = hostile.canary_file(tmp_path / "canary" / "secret.txt", secret)
        caches = [node.host_workdir / "agent"]
        # The canary process listens on the node's own loopback (its network namespace).
        with hostile.canary_process(secret, netns=node.netns) as port:
            aim = hostile.Aim(
                nonce=secrets.token_hex(8),
                secrets=[secret],
                canaries=[str(canary)],
                # The node's sshd host key and the coordinator's key to every node.
                reads=[str(canary), str(node.host_key), str(one.client_key), *map(str, caches)],
                writes=[str(folder) for folder in caches],
                ports=[port],
            )
            context = hostile.hostile_context(
                tmp_path / "ctx", f"{registry.host}/library/busybox:latest", probe, aim
            )
            watch = hostile.Watch([canary, node.host_key, one.client_key], caches)
            run = lab.farm(
                "build", "-t", f"{registry.host}/hostile/ssh:1", "--insecure-registry", registry.host,
                "--platform", "linux/amd64", "--progress", "plain", "--inventory", str(inventory),
                str(context),
            )  # fmt: skip
        assert run.code == 0, build_output(run)
        hostile.assert_contained(build_output(run))
        assert_untouched(watch)
        assert_agent_cache_aimed_at(caches)


# --- farm serve ---------------------------------------------------------------------------------


@dataclass
class HostileServer:
    server: Server
    home: Path  # the HOME the server runs with
    config: Path  # HOME/.docker/config.json, holding `secret`
    secret: str  # also in the server's environment
    caches: list[Path]

    @property
    def port(self) -> int:
        return int(self.server.url.rsplit(":", 1)[1])

    def aim(self, nonce: str, listener: int) -> hostile.Aim:
        """The server's secrets: its token (file and value), its credentials, its environment."""
        token = self.server.state / "token"
        return hostile.Aim(
            nonce=nonce,
            secrets=[self.secret, self.server.token],
            canaries=[str(token), str(self.config)],
            reads=[str(token), str(self.config), str(self.server.state), *map(str, self.caches)],
            writes=[str(folder) for folder in self.caches],
            ports=[self.port, listener],
        )

    def watch(self) -> hostile.Watch:
        return hostile.Watch([self.server.state / "token", self.config], self.caches)


@pytest.fixture(scope="module")
def hostile_server(
    tmp_path_factory: pytest.TempPathFactory, registry: lab.Registry, node_workdir: Path
) -> Iterator[HostileServer]:
    """`farm serve` on the local node, run with a HOME holding a docker credential and a secret in
    its environment."""
    root = tmp_path_factory.mktemp("hostile-serve")
    secret = secrets.token_hex(16)
    home = root / "home"
    config = hostile.docker_config(home, secret)
    inventory = lab.write_inventory(root / "inventory.yaml", workdir=str(node_workdir))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HOME", str(home))
        environment.setenv("FARM_CANARY", secret)
        # Inherits the environment set here.
        server = start_server(root / "state", inventory, "--allow-registry", registry.host)
    try:
        yield HostileServer(server, home, config, secret, hostile.agent_cache_dirs(home, node_workdir))
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_a_hostile_build_through_farm_serve_is_contained(
    tmp_path: Path, registry: lab.Registry, hostile_server: HostileServer, probe: Path
) -> None:
    server = hostile_server.server
    with hostile.canary_process(hostile_server.secret) as listener:
        aim = hostile_server.aim(secrets.token_hex(8), listener)
        context = hostile.hostile_context(
            tmp_path / "ctx", f"{registry.host}/library/busybox:latest", probe, aim
        )
        watch = hostile_server.watch()
        try:
            run = lab.farm(
                "build", "-t", f"{registry.host}/hostile/serve:1", "--platform", "linux/amd64",
                "--progress", "plain", str(context), env=server.env(),
            )  # fmt: skip
            assert run.code == 0, build_output(run)
            hostile.assert_contained(build_output(run))
            assert_untouched(watch)
            assert_agent_cache_aimed_at(hostile_server.caches)
        finally:
            watch.clean()


@pytest.mark.timeout(360)
def test_two_builds_through_farm_serve_cannot_see_each_other(
    tmp_path: Path, registry: lab.Registry, hostile_server: HostileServer, node_workdir: Path, probe: Path
) -> None:
    """Two builds run at once, each with a secret build argument and a context file of its own; each
    RUN step looks, through /proc and the file system, for the other's argument and file while the
    other is running (the probes are gated so that they attack together)."""
    server = hostile_server.server
    sides = {name: (secrets.token_hex(8), secrets.token_hex(16)) for name in ("a", "b")}  # nonce, token
    clients: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"build-{name}.log" for name in sides}
    watch = hostile_server.watch()
    try:
        with hostile.canary_process(hostile_server.secret) as listener:
            try:
                for name, (nonce, token) in sides.items():
                    peer_nonce, peer_token = sides["b" if name == "a" else "a"]
                    peer_file = f"farm-peer-{peer_nonce}.txt"
                    aim = hostile_server.aim(nonce, listener)
                    aim.secrets.append(peer_token)
                    # The peer's file inside its own container (seen through /proc/PID/root) and
                    # where the node laid out its context.
                    aim.canaries += [f"/{peer_file}", *hostile.context_globs(node_workdir, peer_file)]
                    aim.reads += hostile.context_globs(node_workdir, peer_file)
                    aim.gate = 120
                    context = hostile.hostile_context(
                        tmp_path / f"ctx-{name}", f"{registry.host}/library/busybox:latest", probe, aim,
                        files={f"farm-peer-{nonce}.txt": f"the context of build {name}: {nonce}\n"},
                        build_args=["TOKEN"],
                    )  # fmt: skip
                    clients[name] = start_client(
                        logs[name], server, "build", "-t", f"{registry.host}/hostile/pair:{name}",
                        "--platform", "linux/amd64", "--progress", "plain", "--build-arg", f"TOKEN={token}",
                        str(context),
                    )  # fmt: skip
                try:
                    hostile.gate_probes([nonce for nonce, _ in sides.values()], list(clients.values()), 120)
                except lab.LabError as problem:
                    tails = "".join(f"\n--- build {n}:\n{log.read_text()[-3000:]}" for n, log in logs.items())
                    raise AssertionError(f"{problem}{tails}") from problem
                for client in clients.values():
                    client.wait(120)
            finally:
                for client in clients.values():
                    client.kill()
                    client.wait()
        outputs = {name: logs[name].read_text() for name in clients}
        for name, client in clients.items():
            assert client.returncode == 0, outputs[name]
            assert "FARM-PROBE-GATE opened" in outputs[name], hostile.probe_lines(outputs[name])
        escaped = []
        for name, output in outputs.items():
            try:
                hostile.assert_contained(output)
            except AssertionError as problem:
                escaped.append(f"build {name}: {problem}")
        assert not escaped, "\n".join(escaped)
        assert_untouched(watch)
    finally:
        watch.clean()


def start_client(log: Path, server: Server, *args: str) -> subprocess.Popen[bytes]:
    """``farm ARGS`` against the server, in the background, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "farm", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **server.env()},
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_a_tampered_cached_agent_is_replaced_not_run(tmp_path: Path) -> None:
    """An escaped build could rewrite the agent cached in its user's workdir; stage one trusts
    the cached file for its hash, never its name."""
    workdir = lab.build_user_dir("tamper")
    try:
        inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(workdir))
        assert lab.farm("nodes", "check", "--inventory", str(inventory)).code == 0
        (cached,) = (workdir / "agent").glob("farm-agent-*.pyz")
        genuine = cached.read_bytes()
        ran = workdir / "tampered-agent-ran"
        cached.write_bytes(_zipapp(f"open({str(ran)!r}, 'w').close()\n"))
        again = lab.farm("nodes", "check", "--json", "--inventory", str(inventory))
        assert again.code == 0, again.stderr
        assert not ran.exists()
        assert cached.read_bytes() == genuine
        assert oct(cached.stat().st_mode & 0o777) == oct(0o600)
        assert oct((workdir / "agent").stat().st_mode & 0o777) == oct(0o700)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _zipapp(main: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", main)
    return buffer.getvalue()
