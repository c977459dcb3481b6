"""The agent's main loop: read requests on stdin, answer on stdout, build in a worker thread.

The coordinator is the agent's lifeline. When stdin closes, or heartbeats stop during a build,
the build's process group is killed and its folder removed, so a coordinator that dies, even by
SIGKILL, leaves nothing running on the node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import sys
import threading
import time
import traceback
from typing import IO, Any

from agent import facts
from agent.builders import (
    BuilderFailed,
    BuildSpec,
    Cancelled,
    Runner,
    clear_leftovers,
    export_image,
    tidy_store,
)
from agent.protocol import (
    HEARTBEAT_TIMEOUT,
    MARKER,
    PROTOCOL_VERSION,
    Entry,
    Message,
    ProtocolError,
    encode,
    entries_from_manifest,
    manifest_digest,
    read_message,
    read_payload,
)
from agent.slots import hold_slot
from agent.store import DEFAULT_LIMIT, MANIFEST_MAX_AGE, ContentStore, UnsafeEntryError, check_entries
from agent.upload import PushError, push_layout

__all__ = ["main"]

# Below this much free disk in the workdir, cached images are dropped before a build.
_MIN_FREE_DISK = 2 * 1024**3
_AUTH_TIMEOUT = 60.0
_WAITING_FOR_SLOT = "farm: every build slot of this node is taken; waiting for one"
_BUILD_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class _Writer:
    """Messages from several threads, each written whole."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message_type: str, /, **fields: Any) -> None:
        data = encode(message_type, **fields)
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # The coordinator is gone; the lifeline will stop the build.


class Agent:
    def __init__(
        self, workdir: str, stdin: IO[bytes], stdout: IO[bytes], store_limit: int = DEFAULT_LIMIT
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.stdin = stdin
        self.out = _Writer(stdout)
        self.store = ContentStore(self.workdir)
        # The node's own bound on its content store: no coordinator setting exists to send, and
        # the store is shared by every coordinator that uses the node.
        self.store_limit = store_limit
        self.last_heartbeat = time.monotonic()
        self.runner: Runner | None = None
        self.build_thread: threading.Thread | None = None
        self.finished = threading.Event()
        self._authorizations: queue.Queue[str | None] = queue.Queue()

    def serve(self) -> None:
        stdout = self.out
        stdout._stream.write(MARKER + b"\n")
        stdout._stream.flush()
        watchdog = threading.Thread(target=self._watch_heartbeats, daemon=True)
        watchdog.start()
        try:
            while True:
                message = read_message(self.stdin)
                if message is None:
                    break
                self._dispatch(message)
        except ProtocolError as exc:
            self.out.send("error", kind="input", message=f"protocol error: {exc}")
        finally:
            self._cancel()
            if self.build_thread is not None:
                self.build_thread.join()
            self.store.release_leases()
            self.finished.set()

    def _dispatch(self, message: Message) -> None:
        kind = message["type"]
        if kind == "hello":
            if message.get("version") != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"coordinator speaks protocol {message.get('version')!r}, this agent {PROTOCOL_VERSION}"
                )
            self.out.send("hello", version=PROTOCOL_VERSION, python=sys.version.split()[0], pid=os.getpid())
        elif kind == "facts":
            self.out.send("facts", **facts.probe(self.workdir))
        elif kind == "sync":
            self._sync(message)
        elif kind == "build":
            if self.build_thread is not None:
                raise ProtocolError("one build per agent session")
            self.last_heartbeat = time.monotonic()
            self.runner = Runner(lambda line: self.out.send("log", line=line))
            self.build_thread = threading.Thread(target=self._build, args=(message, self.runner))
            self.build_thread.start()
        elif kind == "auth":
            self._authorizations.put(message.get("authorization"))
        elif kind == "heartbeat":
            self.last_heartbeat = time.monotonic()
        elif kind == "cancel":
            self._cancel()
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    def _sync(self, message: Message) -> None:
        """Receive a context manifest, ask for what the store lacks, take those blobs."""
        manifest = read_payload(self.stdin, message.get("size"))
        digest = message.get("context")
        try:
            if digest != manifest_digest(manifest):
                raise UnsafeEntryError(f"context {digest!r} does not match its manifest")
            entries = entries_from_manifest(manifest)
            check_entries(entries)
        except UnsafeEntryError as exc:
            self.out.send("error", kind="input", message=str(exc))
            return
        blobs = [entry[3] for entry in entries if entry[3]]
        needed = self.store.lease(blobs)
        self.out.send("need", digests=needed)
        for wanted in needed:
            blob = read_message(self.stdin)
            if blob is None or blob["type"] != "blob" or blob.get("digest") != wanted:
                raise ProtocolError(f"expected blob {wanted}, got {blob!r}")
            try:
                self.store.receive(wanted, int(blob["size"]), self.stdin)
            except UnsafeEntryError as exc:
                raise ProtocolError(str(exc)) from exc
        # Only now: a manifest in the store promises every blob it names has arrived.
        self.store.save_manifest(digest, manifest)
        self.out.send("synced", context=digest, received=len(needed))
        # After the answer: the lease, not the recency, keeps this context's blobs until the build.
        self.store.touch(set(blobs).difference(needed))
        if needed:  # only a sync that adds blobs can take the store over its limit: each evicts after
            self.store.evict(self.store_limit)
            self.store.drop_stale_manifests(MANIFEST_MAX_AGE)

    def _build(self, request: Message, runner: Runner) -> None:
        build_id = str(request.get("build_id", ""))
        if not _BUILD_ID.match(build_id):
            self.out.send("error", kind="input", message=f"bad build id {build_id!r}")
            return
        build_dir = os.path.join(self.workdir, "builds", build_id)
        try:
            self._run_build(request, build_dir, runner)
        except Cancelled:
            self.out.send("error", kind="node", message="build cancelled")
            with contextlib.suppress(BuilderFailed, OSError):
                clear_leftovers(str(request.get("builder", "")), self.workdir, self._log)
        except BuilderFailed as exc:
            kind = "node" if exc.node_at_fault else "build"
            self.out.send("error", kind=kind, message=str(exc), log_tail=exc.tail)
        except PushError as exc:
            self.out.send("error", kind="registry", message=str(exc), status=exc.status)
        except (UnsafeEntryError, _BadRequest) as exc:
            self.out.send("error", kind="input", message=str(exc))
        except OSError as exc:
            self.out.send("error", kind="node", message=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            self.out.send(
                "error",
                kind="node",
                message=f"agent bug: {exc!r}",
                log_tail=traceback.format_exc().splitlines(),
            )
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)

    def _run_build(self, request: Message, build_dir: str, runner: Runner) -> None:
        # The request is read whole first: what is wrong with it is the coordinator's (``input``);
        # a KeyError or ValueError raised after is this agent's own bug.
        try:
            context = str(request["context"])
            spec = BuildSpec(
                builder=str(request["builder"]),
                workdir=self.workdir,
                build_dir=build_dir,
                platform=str(request["platform"]),
                dockerfile=str(request["dockerfile"]),
                build_args=_string_map(request.get("build_args", {})),
                target=str(request.get("target") or ""),
                insecure_registries=list(request.get("insecure_registries", [])),
                isolation=str(request.get("isolation", "oci")),
                network=str(request.get("network", "default")),
            )
            slots = int(request.get("slots", 1))
            push = request["push"]
            registry_url, repository = str(push["registry_url"]), str(push["repository"])
            authorization = push.get("authorization")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _BadRequest(f"malformed build request: {type(exc).__name__}: {exc}") from exc
        try:
            entries: list[Entry] = self.store.load_context(context)
        except FileNotFoundError:
            raise _BadRequest(f"context {context} was not synced to this node") from None
        # Leased as it is looked up: nothing found here is evicted before it is laid out.
        if self.store.lease(entry[3] for entry in entries if entry[3]):
            raise _BadRequest(f"context {context} was not synced to this node")
        if os.path.exists(build_dir):
            shutil.rmtree(build_dir)
        os.makedirs(build_dir)
        self.store.lay_out(entries, spec.context_dir)
        waiting = "farm: every build slot of this node is taken; waiting for one"
        try:
            with hold_slot(self.workdir, slots, runner.cancelled, lambda: self._log(waiting)):
                tidy_store(spec.builder, self.workdir, runner, _MIN_FREE_DISK)
                layout = export_image(spec, runner)
                digest, size, media_type = push_layout(
                    layout, registry_url, repository, authorization, refresh=self._ask_authorization
                )
        except InterruptedError as exc:
            raise Cancelled() from exc
        self.out.send("result", digest=digest, size=size, media_type=media_type)

    def _ask_authorization(self) -> str | None:
        """A fresh push credential from the coordinator (it never touches this node's disk)."""
        self.out.send("auth")
        try:
            return self._authorizations.get(timeout=_AUTH_TIMEOUT)
        except queue.Empty:
            return None

    def _log(self, line: str) -> None:
        self.out.send("log", line=line)

    def _cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()

    def _watch_heartbeats(self) -> None:
        while not self.finished.wait(1.0):
            running = self.build_thread is not None and self.build_thread.is_alive()
            if running and time.monotonic() - self.last_heartbeat > HEARTBEAT_TIMEOUT:
                self._cancel()


class _BadRequest(Exception):
    """A build request that is malformed, or names a context this node lacks: an ``input`` error."""


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("build_args must be a map")
    return {str(key): str(item) for key, item in value.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm-agent", description="farm's node agent")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/farm-agent"))
    args = parser.parse_args(argv)
    prepare_workdir(args.workdir)
    Agent(args.workdir, sys.stdin.buffer, sys.stdout.buffer).serve()
    return 0


def prepare_workdir(workdir: str) -> None:
    """The workdir is this user's alone (contexts, build arguments, the builder's store), and so is
    the runtime folder a rootless builder needs; a login without a session (sshd without PAM, the
    local node's switch of user) sets none."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chmod(workdir, 0o700)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.access(runtime, os.W_OK | os.X_OK):
        runtime = os.path.join(os.path.abspath(workdir), "run")
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = runtime
