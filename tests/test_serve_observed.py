"""``farm serve`` as an operator observes it: a real Prometheus (Debian's package) scraping it while
builds run, queried with PromQL through its HTTP API, and the status page in headless Chromium
(Debian's package)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import lab
from tests.servelab import Server, serving_local_node, small_context

pytestmark = pytest.mark.lab

PLATFORMS = ("linux/amd64", "linux/arm64")


@dataclass
class Prometheus:
    url: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes]

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        reply.raise_for_status()
        document = reply.json()
        assert document["status"] == "success", document
        assert document["data"]["resultType"] == "vector", document
        return list(document["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single sample ``promql`` evaluates to now, or None while there is none."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: Callable[[float], bool], seconds: float = 30) -> float:
        """Poll the query API until the scrapes have brought ``promql`` to what is expected."""
        deadline = time.monotonic() + seconds
        seen: float | None = None
        while time.monotonic() < deadline:
            seen = self.value(promql)
            if seen is not None and expected(seen):
                return seen
            time.sleep(0.25)
        raise AssertionError(f"{promql} is {seen} after {seconds:.0f} s\n{self.log.read_text()[-3000:]}")


def prometheus_config(path: Path, server: Server) -> Path:
    target = server.url.removeprefix("http://")
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: farm\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    metrics_path: /metrics\n"
        "    scheme: http\n"
        "    authorization:\n"
        "      type: Bearer\n"
        f"      credentials_file: {server.state / 'token'}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, node_workdir: Path, registry: lab.Registry
) -> Iterator[Server]:
    with serving_local_node(
        tmp_path_factory.mktemp("observed"), node_workdir, "--allow-registry", registry.host
    ) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Iterator[Prometheus]:
    if shutil.which("prometheus") is None:
        raise lab.LabError(f"no prometheus binary; {lab.SETUP_HINT}")
    root = tmp_path_factory.mktemp("prometheus")
    config = prometheus_config(root / "prometheus.yml", server)
    port = lab.free_port()
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Prometheus(f"http://127.0.0.1:{port}", config, log, process)

    def ready() -> bool:
        if process.poll() is not None:
            raise lab.LabError(f"prometheus exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(running.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        lab.wait_until(ready, "prometheus ready", seconds=30)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, server: Server, registry: lab.Registry) -> lab.FarmRun:
    """One build of a tiny context for two platforms on the local node, through the server."""
    root = tmp_path_factory.mktemp("observed-ctx")
    context = small_context(root / "ctx", registry, text=f"observed {uuid.uuid4()}")
    run = lab.farm(
        "build", "-t", f"{registry.host}/serve/observed:1", "--platform", ",".join(PLATFORMS),
        "--progress", "plain", str(context),
        env=server.env(),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    return run


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config(prometheus: Prometheus) -> None:
    done = subprocess.run(
        ["promtool", "check", "config", str(prometheus.config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_prometheus_scrapes_the_server_with_its_token(prometheus: Prometheus, server: Server) -> None:
    assert prometheus.wait_for('up{job="farm"}', lambda v: v == 1) == 1
    targets = httpx.get(prometheus.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    [farm] = [t for t in targets if t["labels"]["job"] == "farm"]
    assert farm["health"] == "up", farm
    assert farm["scrapeUrl"] == server.url + "/metrics"
    assert prometheus.wait_for("farm_build_info", lambda v: v == 1) == 1
    [info] = prometheus.query("farm_build_info")
    assert info["metric"]["version"] == server.get("/api/server").json()["version"]


def test_promql_sees_the_builds_and_the_node(
    prometheus: Prometheus, server: Server, built: lab.FarmRun
) -> None:
    prometheus.wait_for('up{job="farm"}', lambda v: v == 1)
    finished = prometheus.wait_for(
        'sum(farm_builds_finished_total{job="farm",result="success"})', lambda v: v >= len(PLATFORMS)
    )
    assert finished == len(PLATFORMS)
    by_mode = {
        (r["metric"]["platform"], r["metric"]["mode"]): float(r["value"][1])
        for r in prometheus.query('farm_builds_finished_total{job="farm",result="success"}')
    }
    assert by_mode == {("linux/amd64", "native"): 1, ("linux/arm64", "emulated"): 1}
    assert prometheus.value('sum(farm_builds_finished_total{result!="success"})') in (None, 0)
    assert prometheus.value("sum(farm_builds_started_total)") == len(PLATFORMS)
    assert prometheus.value('farm_build_duration_seconds_count{platform="linux/arm64"}') == 1
    assert (
        prometheus.value('farm_emulation_fallbacks_total{platform="linux/arm64",reason="no_native_node"}')
        == 1
    )
    assert prometheus.value('farm_index_pushes_total{result="success"}') == 1
    assert prometheus.value("farm_queue_wait_seconds_count") == 1
    # The gauges: the local node up, its slots free again, nothing queued or running.
    assert prometheus.value('farm_nodes{state="up",platform="linux/amd64"}') == 1
    assert prometheus.value('sum(farm_nodes{state!="up"})') in (None, 0)
    assert prometheus.value('farm_node_slots{node="local"}') == 8
    assert prometheus.wait_for('farm_node_busy_slots{node="local"}', lambda v: v == 0) == 0
    assert prometheus.wait_for('farm_node_heartbeat_age_seconds{node="local"}', lambda v: v < 60) < 60
    assert prometheus.value("farm_queue_length") == 0
    assert prometheus.value("farm_builds_running") == 0
    # A histogram Prometheus can aggregate: the emulated build's duration has a bucket that
    # holds it, so histogram_quantile answers a number.
    quantile = prometheus.value(
        'histogram_quantile(0.5, sum by (le) (farm_build_duration_seconds_bucket{mode="emulated"}))'
    )
    assert quantile is not None
    assert quantile > 0
    assert prometheus.value('max_over_time(up{job="farm"}[5m])') == 1


# --- the status page in Chromium ------------------------------------------------------------------


def chromium(profile: Path, url: str, *extra: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise lab.LabError(f"no chromium; {lab.SETUP_HINT}")
    done = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *extra, url,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def rows(dom: str, marker: str) -> list[dict[str, str]]:
    """The data-* attributes of every <tr> carrying ``marker`` (e.g. ``data-node``)."""
    found = []
    for tag in re.findall(r"<tr\b[^>]*>", dom):
        attributes = {k: html.unescape(v) for k, v in re.findall(r'(data-[a-z-]+)="([^"]*)"', tag)}
        if marker in attributes:
            found.append(attributes)
    return found


def row_cells(dom: str, attribute: str) -> list[list[str]]:
    """The text of each cell of the row whose opening tag contains ``attribute``."""
    match = re.search(r"<tr\b[^>]*" + re.escape(attribute) + r"[^>]*>(.*?)</tr>", dom, re.S)
    assert match, attribute
    return [
        html.unescape(re.sub(r"<[^>]+>", " ", cell)).split()
        for cell in re.findall(r"<td\b[^>]*>(.*?)</td>", match.group(1), re.S)
    ]


def test_the_status_page_in_chromium_shows_the_node_and_the_build(
    tmp_path: Path, server: Server, built: lab.FarmRun
) -> None:
    build = re.search(r"build ([0-9a-f]{16}) submitted", built.stderr)
    assert build, built.stderr
    # The token once in the address: the server sets its cookie and redirects to /, which
    # Chromium follows with the cookie; the DOM is the page after the redirect.
    dom = chromium(tmp_path / "profile", f"{server.url}/?token={server.token}", "--dump-dom")
    assert "<title>farm serve</title>" in dom, dom[:2000]
    assert "needs the server's token" not in dom

    [node] = rows(dom, "data-slots")
    assert node == {
        "data-node": "local",
        "data-state": "up",
        "data-platform": "linux/amd64",
        "data-busy": "0",
        "data-slots": "8",
    }
    node_text = row_cells(dom, 'data-slots="8"')
    assert (node_text[0], node_text[1], node_text[3]) == (["local"], ["up"], ["0", "/", "8"])
    assert node_text[4][-1] == "ago"  # the last heartbeat

    mine = [r for r in rows(dom, "data-build") if r["data-build"] == build.group(1)]
    assert [(r["data-platform"], r["data-node"], r["data-mode"], r["data-build-state"]) for r in mine] == [
        ("linux/amd64", "local", "native", "succeeded"),
        ("linux/arm64", "local", "emulated", "succeeded"),
    ]
    status = server.get(f"/api/builds/{build.group(1)}").json()
    for platform in status["platform_results"]:
        cells = row_cells(dom, f'data-build="{build.group(1)}" data-platform="{platform["platform"]}"')
        text = [" ".join(cell) for cell in cells]
        # The first row carries the build's cells (id, tags, submitter, state) before its own.
        own = text[4:8] if platform["platform"] == PLATFORMS[0] else text[0:4]
        assert own[:3] == [platform["platform"], "local", platform["mode"]], text
        assert float(own[3]) == pytest.approx(platform["seconds"], abs=0.051), text
        assert float(own[3]) > 0
    first = [" ".join(cell) for cell in row_cells(dom, f'data-build="{build.group(1)}"')]
    assert (first[0], first[2], first[3]) == (build.group(1), "tests", "succeeded")
    assert first[-1].startswith("took ")
    # It updates itself.
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', dom)


def test_the_status_page_screenshot(tmp_path: Path, server: Server, built: lab.FarmRun) -> None:
    shot = tmp_path / "status.png"
    chromium(
        tmp_path / "profile", f"{server.url}/?token={server.token}", f"--screenshot={shot}",
        "--window-size=1280,800", "--hide-scrollbars",
    )  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # a page with tables in it, not a blank or an error page


def test_chromium_without_the_token_gets_the_login_page(tmp_path: Path, server: Server) -> None:
    dom = chromium(tmp_path / "profile", server.url + "/", "--dump-dom")
    assert "needs the server's token" in dom
    assert "data-node" not in dom
