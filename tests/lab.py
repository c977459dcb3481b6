"""The real parts the integration tests run against: a registry, dockerd, skopeo, farm itself.

Each test session starts its own CNCF distribution registry on a free loopback port, with its
data in a temporary folder, seeded with the multi-platform busybox base that
``deploy/lab/setup.sh`` makes from Debian packages. dockerd and binfmt_misc come from that
set-up script too (``tests/run.sh`` runs it first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from tests.certs import KeyPair

REPO = Path(__file__).resolve().parent.parent
LAB_STATE = Path(os.environ.get("FARM_LAB_STATE", REPO / ".lab"))
BUSYBOX_LAYOUT = LAB_STATE / "busybox-oci"
SETUP_HINT = "run deploy/lab/setup.sh (tests/run.sh does) to install and start the lab"


# The unprivileged user the local node's agent runs as (deploy/node/setup-node.sh --local makes
# it; deploy/lab/setup.sh runs that). SSH lab nodes log in as it too.
BUILD_USER = "farm-build"


class LabError(RuntimeError):
    pass


def build_user_dir(prefix: str) -> Path:
    """A new empty folder the build user owns, where it can reach it (pytest's own temporary
    folders are root's alone): an agent workdir for a test."""
    import pwd
    import tempfile

    entry = pwd.getpwnam(BUILD_USER)
    path = Path(tempfile.mkdtemp(prefix=f"farm-{prefix}-", dir="/tmp"))
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def as_build_user(argv: list[str]) -> list[str]:
    """``argv`` run as the build user, with its own home and the system's PATH (as farm runs the
    local node's agent)."""
    import pwd

    home = pwd.getpwnam(BUILD_USER).pw_dir
    return [
        "setpriv", f"--reuid={BUILD_USER}", f"--regid={BUILD_USER}", "--init-groups",
        "env", "-i", f"HOME={home}", f"USER={BUILD_USER}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        *argv,
    ]  # fmt: skip


def build_user_store(workdir: Path, builder: str = "buildah") -> list[str]:
    """The builder command, as the build user, on the store its agent keeps in ``workdir``."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agent.builders import storage_command; "
        "print(*storage_command(sys.argv[2], sys.argv[3]))"
    )
    argv = ["/usr/bin/python3", "-I", "-c", code, str(REPO), builder, str(workdir)]
    done = subprocess.run(as_build_user(argv), capture_output=True, text=True, timeout=120, check=True)
    return as_build_user(done.stdout.split())


def unmount_below(path: Path) -> None:
    """Unmount what overlay storage left mounted under ``path`` (a killed build's containers)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def processes_running(marker: str) -> list[str]:
    """Command lines, from the process table, of live processes mentioning ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                text = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in text and state != "Z":
            found.append(f"{pid}: {text}")
    return found


HELLO = REPO / "examples" / "hello"


def hello_context(tmp_path: Path, registry: Registry) -> Path:
    """examples/hello, with its base pointing at this session's registry."""
    context = tmp_path / "hello"
    context.mkdir()
    for item in HELLO.iterdir():
        (context / item.name).write_bytes(item.read_bytes())
        os.chmod(context / item.name, item.stat().st_mode)
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("localhost:5000", registry.host))
    # A context of this test's own: no earlier build (another test's) is reused as unchanged.
    (context / "nonce").write_text(str(tmp_path))
    return context


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(check: object, what: str, seconds: float = 20.0) -> None:
    """Poll a readiness check (a service coming up), failing loudly after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise LabError(f"{what} did not happen within {seconds:.0f} s")


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    data: Path
    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Take the registry down (a fault to inject; also the fixture's teardown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def tags(self, repository: str) -> list[str]:
        response = httpx.get(self.url(f"/v2/{repository}/tags/list"))
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return list(response.json().get("tags") or [])

    def raw_manifest(self, reference: str) -> dict[str, object]:
        """What a real client (skopeo) reads for ``repository:tag`` or ``repository@digest``."""
        out = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{self.host}/{reference}"])
        document: dict[str, object] = json.loads(out)
        return document


class Recording(httpx.AsyncBaseTransport):
    """httpx's transport, noting every exchange under the auth layer."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[tuple[str, str, int, str]] = []  # method, path, status, auth scheme

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        scheme = request.headers.get("authorization", "").partition(" ")[0]
        self.exchanges.append((request.method, request.url.path, response.status_code, scheme))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    address: str = "127.0.0.1",
    *,
    seed: bool = True,
    extra_config: str = "",
    tls: KeyPair | None = None,
) -> Iterator[Registry]:
    """A CNCF distribution registry on a free port of ``address``, its data under ``workdir``.

    With ``seed``, it holds ``library/busybox:latest`` (the multi-platform base from setup.sh).
    ``extra_config`` adds YAML lines to its config (auth, say: seed it then with credentials);
    with ``tls`` it serves HTTPS with that certificate.
    """
    if seed and not BUSYBOX_LAYOUT.exists():
        raise LabError(f"no busybox base image at {BUSYBOX_LAYOUT}; {SETUP_HINT}")
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = int(probe.getsockname()[1])
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    config = workdir / "config.yml"
    serve_tls = f", tls: {{certificate: {tls.cert_path}, key: {tls.key_path}}}" if tls else ""
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {data}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '{address}:{port}'{serve_tls}}}\n" + extra_config
    )
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    registry = Registry(f"{address}:{port}", data, process)
    url = f"{'https' if tls else 'http'}://{registry.host}/v2/"
    verify = ssl.create_default_context(cafile=str(tls.cert_path)) if tls else True
    try:
        wait_until(
            lambda: _answers(url, verify) or process.poll() is not None,
            f"registry start on {address}:{port}",
        )
        if process.poll() is not None:
            raise LabError(f"the registry exited: {log_path.read_text()[-2000:]}")
        if seed:
            run(
                [
                    "skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{BUSYBOX_LAYOUT}:latest", f"docker://{registry.host}/library/busybox:latest",
                ]
            )  # fmt: skip
        yield registry
    finally:
        registry.stop()


def _answers(url: str, verify: ssl.SSLContext | bool) -> bool:
    """Any HTTP answer counts: a registry with auth answers 401."""
    try:
        httpx.get(url, timeout=1, verify=verify)
    except httpx.HTTPError:
        return False
    return True


def run(
    argv: list[str], *, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def require_docker() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        raise LabError(f"dockerd is not running; {SETUP_HINT}")


def docker_run(image: str, platform: str, *command: str) -> str:
    """Run ``image`` as ``platform`` with a real docker client, pulling the index afresh."""
    return run(["docker", "run", "--rm", "--pull", "always", "--platform", platform, image, *command]).strip()


@dataclass
class FarmRun:
    code: int
    stdout: str
    stderr: str


def farm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> FarmRun:
    """Run the real ``farm`` command line as a user would."""
    done = subprocess.run(
        [sys.executable, "-m", "farm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=900,
    )
    return FarmRun(done.returncode, done.stdout, done.stderr)


def stuck_run(marker: str) -> str:
    """A RUN line that says it started, then waits for an hour: a build to stop half-way."""
    return f"RUN echo started-{marker}; sleep 3600; echo {marker}"


def start_farm(*args: str) -> subprocess.Popen[str]:
    """``farm ARGS`` in the background, its output (stdout and stderr together) read line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "farm", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_started(farm: subprocess.Popen[str], marker: str, count: int = 1) -> set[str]:
    """Read ``farm --progress plain`` output until ``count`` platforms ran ``stuck_run(marker)``;
    return their line prefixes (``[PLATFORM NODE``)."""
    assert farm.stdout is not None
    started: set[str] = set()
    for line in farm.stdout:
        if line.rstrip().endswith(f"] started-{marker}"):
            started.add(line.split("]")[0])
            if len(started) == count:
                break
    assert len(started) == count, f"{len(started)} of {count} platforms started before farm ended"
    return started


def write_inventory(path: Path, **node: object) -> Path:
    """An inventory with one local node; ``node`` overrides its fields."""
    fields = {"name": "local", "local": True, "slots": 8, **node}
    lines = ["nodes:", "  - " + "\n    ".join(f"{key}: {json.dumps(value)}" for key, value in fields.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
