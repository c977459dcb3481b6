"""``farm serve`` for the tests: started as an operator starts it, on a free loopback port, over an
inventory of this machine; and the small contexts its tests build."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests import lab


@dataclass
class Server:
    url: str
    token: str
    state: Path
    inventory: Path
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def delete(self, path: str) -> httpx.Response:
        return httpx.delete(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=150)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def env(self) -> dict[str, str]:
        """How a CI job points ``farm build`` at it."""
        return {"FARM_SERVER": self.url, "FARM_SERVER_TOKEN": self.token, "FARM_SUBMITTER": "tests"}

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = self.get("/metrics")
        response.raise_for_status()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM, as an operator stops it; SIGKILL if it has not ended within a minute."""
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def start_server(state: Path, inventory: Path, *options: str) -> Server:
    """``farm serve`` as an operator starts it, on a free port; ready once it answers."""
    port = lab.free_port()
    log = state.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "farm", "serve", "--listen", f"127.0.0.1:{port}",
                "--inventory", str(inventory), "--state-dir", str(state), "--probe-interval", "2s",
                *options,
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    token_file = state / "token"

    def ready() -> bool:
        if process.poll() is not None:
            raise lab.LabError(f"farm serve exited {process.returncode}:\n{log.read_text()}")
        if not token_file.exists():
            return False
        token = token_file.read_text().strip()
        try:
            return (
                httpx.get(f"{url}/api/server", headers={"Authorization": f"Bearer {token}"}).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    lab.wait_until(ready, "farm serve answering")
    return Server(url, token_file.read_text().strip(), state, inventory, log, process)


@contextlib.contextmanager
def serving_local_node(root: Path, node_workdir: Path, *options: str) -> Iterator[Server]:
    """A `farm serve` over an inventory of this machine, stopped (or killed) afterwards."""
    inventory = lab.write_inventory(root / "inventory.yaml", workdir=str(node_workdir))
    running = start_server(root / "state", inventory, *options)
    try:
        yield running
    finally:
        running.stop()


def small_context(root: Path, registry: lab.Registry, text: str = "hello") -> Path:
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(
        textwrap.dedent(
            f"""\
            FROM {registry.host}/library/busybox
            COPY greeting.txt /greeting.txt
            RUN cat /greeting.txt && uname -m > /machine.txt
            """
        )
    )
    (root / "greeting.txt").write_text(text + "\n")
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(50_000))
    return root


def build_id(stderr: str) -> str:
    found = re.search(r"build ([0-9a-f]{16}) submitted", stderr)
    assert found, stderr
    return found.group(1)
