"""The Prometheus metrics of ``farm serve``: names, labels and buckets in one place.

An edge: it knows prometheus-client and nothing of builds or nodes beyond the plain values the
coordinator hands it. Counters and histograms are fed as things happen; the gauges describing the
farm now (nodes, slots, heartbeats, queue) are read from a snapshot at each scrape, so they are
never stale and never half-updated.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total`` on counters, no tag,
digest or error text as a label. The deploy/ rules and dashboard use these exact names.

    farm_build_info{version}                         1
    farm_builds_started_total{platform,mode}         a platform began building on a node
    farm_builds_finished_total{platform,mode,result} that attempt ended: success|failure|cancelled
    farm_build_duration_seconds{platform,mode}       successful attempts, histogram
    farm_queue_wait_seconds                          submit → start, histogram
    farm_emulation_fallbacks_total{platform,reason}  no_native_node | native_busy | native_unavailable
    farm_nodes{state,platform}                       up|down|draining|cordoned|quarantined × native platform
    farm_node_slots{node}, farm_node_busy_slots{node}
    farm_node_heartbeat_age_seconds{node}            since the node last answered (absent: never)
    farm_ssh_connect_seconds{node}                   histogram; farm_ssh_connect_errors_total{node}
    farm_context_bytes_sent_total                    context bytes sent to nodes
    farm_context_bytes_skipped_total                 context bytes a node had already
    farm_index_pushes_total{result}                  success | failure
    farm_queue_length, farm_builds_running
    (beyond the agreed set)
    farm_build_requests_total{result}                whole builds: success|partial|failure|cancelled
    farm_platforms_reused_total{platform}            platforms unchanged since an earlier build
    farm_upload_bytes_received_total                 context bytes clients uploaded to the server
    farm_upload_bytes_skipped_total                  context bytes the server had already
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

__all__ = ["NODE_STATES", "FarmSnapshot", "Metrics", "NodeSnapshot"]

NODE_STATES = ("up", "down", "draining", "cordoned", "quarantined")

_BUILD_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
_SSH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, float("inf"))


@dataclass(frozen=True)
class NodeSnapshot:
    name: str
    state: str  # one of NODE_STATES
    platform: str  # its native platform, "unknown" before its first probe
    slots: int
    busy: int
    heartbeat_age: float | None  # seconds since it last answered; None: never


@dataclass(frozen=True)
class FarmSnapshot:
    nodes: tuple[NodeSnapshot, ...]
    queue_length: int
    builds_running: int


class Metrics:
    """farm serve's metrics, in a registry of their own (nothing of the process's default one)."""

    def __init__(self, version: str, snapshot: Callable[[], FarmSnapshot]) -> None:
        # No ``*_created`` series beside every counter: they double the series and no rule uses
        # them. (A process-wide switch of prometheus-client; this process is the server.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge("farm_build_info", "The farm version serving, always 1.", ["version"], registry=r)
        info.labels(version=version).set(1)
        self._started = Counter(
            "farm_builds_started", "Platform builds begun on a node.", ["platform", "mode"], registry=r
        )
        self._finished = Counter(
            "farm_builds_finished",
            "Platform builds ended, by result (success, failure, cancelled).",
            ["platform", "mode", "result"],
            registry=r,
        )
        self._duration = Histogram(
            "farm_build_duration_seconds",
            "How long successful platform builds took on their node, sync to push.",
            ["platform", "mode"],
            buckets=_BUILD_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "farm_queue_wait_seconds",
            "How long builds waited in the server's queue, from submission to start.",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self._fallbacks = Counter(
            "farm_emulation_fallbacks",
            "Platforms built under QEMU, by why no native node took them.",
            ["platform", "reason"],
            registry=r,
        )
        self._ssh_seconds = Histogram(
            "farm_ssh_connect_seconds",
            "SSH connection set-up time to a node, handshake and authentication.",
            ["node"],
            buckets=_SSH_BUCKETS,
            registry=r,
        )
        self._ssh_errors = Counter(
            "farm_ssh_connect_errors", "SSH connections to a node that failed.", ["node"], registry=r
        )
        self._sent = Counter("farm_context_bytes_sent", "Context bytes sent to nodes.", registry=r)
        self._skipped = Counter(
            "farm_context_bytes_skipped", "Context bytes not sent: the node had them already.", registry=r
        )
        self._index_pushes = Counter(
            "farm_index_pushes", "Image indexes pushed under their tags, by result.", ["result"], registry=r
        )
        self._requests = Counter(
            "farm_build_requests",
            "Builds (all their platforms) ended, by result (success, partial, failure, cancelled).",
            ["result"],
            registry=r,
        )
        self._reused = Counter(
            "farm_platforms_reused",
            "Platforms not built: unchanged since an earlier build and still in the registry.",
            ["platform"],
            registry=r,
        )
        self._uploaded = Counter(
            "farm_upload_bytes_received", "Context bytes clients uploaded to the server.", registry=r
        )
        self._upload_skipped = Counter(
            "farm_upload_bytes_skipped",
            "Context bytes clients did not upload: the server had them.",
            registry=r,
        )
        for result in ("success", "failure"):
            self._index_pushes.labels(result=result)
        for result in ("success", "partial", "failure", "cancelled"):
            self._requests.labels(result=result)
        r.register(_FarmCollector(snapshot))

    # --- fed by the coordinator as things happen -------------------------------------------------

    def platform_started(self, platform: str, mode: str) -> None:
        self._started.labels(platform=platform, mode=mode).inc()

    def platform_finished(self, platform: str, mode: str, result: str, seconds: float | None = None) -> None:
        self._finished.labels(platform=platform, mode=mode, result=result).inc()
        if seconds is not None:
            self._duration.labels(platform=platform, mode=mode).observe(seconds)

    def platform_reused(self, platform: str) -> None:
        self._reused.labels(platform=platform).inc()

    def build_finished(self, result: str) -> None:
        self._requests.labels(result=result).inc()

    def queue_waited(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def emulation_fallback(self, platform: str, reason: str) -> None:
        self._fallbacks.labels(platform=platform, reason=reason).inc()

    def ssh_connected(self, node: str, seconds: float) -> None:
        self._ssh_seconds.labels(node=node).observe(seconds)
        self._ssh_errors.labels(node=node)  # the series exists at 0, so rate() sees the first error

    def ssh_failed(self, node: str) -> None:
        self._ssh_errors.labels(node=node).inc()

    def context_synced(self, sent: int, skipped: int) -> None:
        self._sent.inc(sent)
        self._skipped.inc(skipped)

    def context_uploaded(self, received: int, skipped: int) -> None:
        self._uploaded.inc(received)
        self._upload_skipped.inc(skipped)

    def index_pushed(self, success: bool) -> None:
        self._index_pushes.labels(result="success" if success else "failure").inc()

    # --- exposition -------------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape with this Accept header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _FarmCollector(Collector):
    """The gauges of the farm as it is at scrape time."""

    def __init__(self, snapshot: Callable[[], FarmSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        farm = self._snapshot()
        nodes = GaugeMetricFamily(
            "farm_nodes", "Nodes by state and native platform.", labels=["state", "platform"]
        )
        platforms = sorted({node.platform for node in farm.nodes})
        for platform in platforms:
            for state in NODE_STATES:
                count = sum(1 for n in farm.nodes if n.platform == platform and n.state == state)
                nodes.add_metric([state, platform], count)
        slots = GaugeMetricFamily("farm_node_slots", "Concurrent builds a node takes.", labels=["node"])
        busy = GaugeMetricFamily(
            "farm_node_busy_slots", "A node's slots this server's builds hold.", labels=["node"]
        )
        age = GaugeMetricFamily(
            "farm_node_heartbeat_age_seconds",
            "Seconds since the node last answered a probe or sent a build event.",
            labels=["node"],
        )
        for node in farm.nodes:
            slots.add_metric([node.name], node.slots)
            busy.add_metric([node.name], node.busy)
            if node.heartbeat_age is not None:
                age.add_metric([node.name], node.heartbeat_age)
        queue = GaugeMetricFamily("farm_queue_length", "Builds waiting in the server's queue.")
        queue.add_metric([], farm.queue_length)
        running = GaugeMetricFamily("farm_builds_running", "Builds the server is running.")
        running.add_metric([], farm.builds_running)
        return [nodes, slots, busy, age, queue, running]

    def describe(self) -> Iterable[Metric]:
        return []  # computed at each scrape; nothing to check against other collectors
