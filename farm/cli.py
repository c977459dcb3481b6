"""The ``farm`` command line: parse options into models, call one function, print its result.

Commands raise; they never exit. The ``farm`` group's ``invoke`` is the one boundary where what a
command returned (a build's ``Outcome``) and what it raised become a message and an exit code:

    returned Pushed / Partial           0 / 3
    raised   FarmError                  its exit_code: 1 failed, 2 bad input, 70 a server's bug,
                                        130 cancelled (on farm serve, by another client)
    raised   KeyboardInterrupt          130 (Ctrl-C, or SIGTERM: ``_run`` turns it into one)
    raised   anything else              70, a bug: its traceback is shown

An exception group (from a TaskGroup) is judged by its leaves: a bug anywhere in it makes it a bug
(exit 70, the bug's traceback shown; ``--debug`` shows the whole group), else an interruption, else
the first FarmError. ``main()`` runs the group; tests run it through click's ``CliRunner`` with a
``Cli`` object whose ``run_build`` is theirs (flask's ``FlaskCliRunner`` does the same with an app).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import signal
import socket
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from farm.errors import (
    EXIT_BUG,
    EXIT_CANCELLED,
    BuildError,
    BuildFailedError,
    FarmError,
    InputError,
    bug_in,
    error_leaves,
)
from farm.paths import FARM_KNOWN_HOSTS, STATE_DIR

# Each command imports what only it needs: the process is started for one command, and its
# start-up is most of the time of a quick one (an unchanged rebuild, an imagetools create).
if TYPE_CHECKING:
    from farm.api import BuildOptions, BuildRequest, BuildResult, EventSink, Outcome
    from farm.inventory import Inventory, NodeSpec
    from farm.nodes import Node
    from farm.platforms import Platform
    from farm.scheduler import Decision
    from farm.serve import ServerOptions

__all__ = ["Cli", "Here", "OnServer", "RunBuild", "cli", "main"]

T = TypeVar("T")


@dataclass(frozen=True)
class Here:
    """``farm build`` builds on these nodes itself."""

    inventory: Inventory
    drained: frozenset[str]


@dataclass(frozen=True)
class OnServer:
    """``farm build --server``: a ``farm serve`` builds, on its own nodes."""

    server: ServerOptions


RunBuild = Callable[
    ["BuildRequest", "Here | OnServer", "EventSink", Callable[[str], None]], Awaitable["BuildResult"]
]


async def run_build_here_or_on_server(
    request: BuildRequest, where: Here | OnServer, on_event: EventSink, on_note: Callable[[str], None]
) -> BuildResult:
    """How ``farm build`` builds: ``farm.build.run_build`` here, or the same on a ``farm serve``."""
    if isinstance(where, OnServer):
        from farm.serve import remote_build

        return await remote_build(where.server, request, on_event, on_note)
    from farm.build import run_build
    from farm.pool import NodePool

    async with NodePool(where.inventory, drained=where.drained) as pool:
        return await run_build(request, pool, on_event)


@dataclass
class Cli:
    """What every command shares (click's ``ctx.obj``); tests pass their own ``run_build``."""

    debug: bool = False
    run_build: RunBuild = run_build_here_or_on_server


class _FarmGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn its outcome or its error into a message and an exit code."""
        try:
            returned = super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise  # click's own: --help, --version, usage errors (exit 2)
        except BaseException as error:
            ctx.exit(_report(error, debug=isinstance(ctx.obj, Cli) and ctx.obj.debug))
        if returned is not None:
            from farm.api import Partial, Pushed

            if isinstance(returned, Pushed | Partial):
                ctx.exit(returned.exit_code)
        return returned


_INVENTORY_OPTION = click.option(
    "--inventory",
    type=click.Path(path_type=Path),
    envvar="FARM_INVENTORY",
    help="Node inventory (default: $FARM_INVENTORY, else this machine).",
)
_STATE_OPTION = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="FARM_STATE_DIR",
    default=STATE_DIR,
    show_default="~/.local/state/farm",
    help="Where farm keeps which nodes are drained ($FARM_STATE_DIR).",
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=_FarmGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="farm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build multi-platform container images on native nodes, with QEMU only by policy."""
    ctx.ensure_object(Cli).debug = debug


@cli.command()
@click.argument("context", type=click.Path(path_type=Path))
@click.option(
    "-t",
    "--tag",
    "tags",
    multiple=True,
    required=True,
    help="Name and tag, e.g. registry/repo:1.0 (repeatable).",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="Target platforms, comma separated (repeatable). Default: this machine's.",
)
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(path_type=Path),
    help="Dockerfile (default: CONTEXT/Dockerfile).",
)
@click.option(
    "--build-arg",
    "build_args",
    multiple=True,
    help="Build-time variable KEY=VALUE, or KEY to take it from the environment.",
)
@click.option("--target", default="", help="Build this stage of the Dockerfile.")
@click.option(
    "--network",
    type=click.Choice(["default", "host", "none"]),
    default="default",
    show_default=True,
    help="RUN steps' network: their own with outbound access (default), the node's own, or none.",
)
@click.option(
    "--emulation",
    "emulation",
    multiple=True,
    help="QEMU policy: allow|deny, or per platform allow=P,... / deny=P,... (repeatable).",
)
@click.option(
    "--label", "labels", multiple=True, help="Use only nodes with this label KEY=VALUE (repeatable)."
)
@click.option(
    "--native-wait", help="How long to wait for a busy native node before emulating (e.g. 90s, 5m)."
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Other nodes to try after a node fault.",
)
@click.option("--allow-partial", is_flag=True, help="Push what succeeded if some platforms fail (exit 3).")
@click.option("--no-cache", is_flag=True, help="Build every platform, even those unchanged since last time.")
@click.option(
    "--dry-run", is_flag=True, help="Print where each platform would build, and why; build nothing."
)
@click.option("--append", is_flag=True, help="Keep the tag's other platforms; replace only these.")
@click.option("--annotation", "annotations", multiple=True, help="Index annotation KEY=VALUE (repeatable).")
@_INVENTORY_OPTION
@_STATE_OPTION
@click.option(
    "--metadata-file",
    type=click.Path(path_type=Path),
    help="Write the build's result as JSON here.",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "plain", "tty"]),
    default="auto",
    show_default=True,
    help="How to show progress.",
)
@click.option(
    "--insecure-registry",
    "insecure",
    multiple=True,
    help="Talk plain HTTP to this HOST[:PORT] (loopback registries always are).",
)
# --- farm serve: build on a server (farm/serve) ---
@click.option(
    "--server",
    envvar="FARM_SERVER",
    help="Build on this farm serve (http://HOST:PORT) instead of here ($FARM_SERVER).",
)
@click.option(
    "--server-token",
    envvar="FARM_SERVER_TOKEN",
    help="The server's token ($FARM_SERVER_TOKEN; default: STATE-DIR/token, for a server on this machine).",
)
# --- end farm serve ---
@click.pass_obj
def build(
    shared: Cli,
    context: Path,
    tags: tuple[str, ...],
    platforms: tuple[str, ...],
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    target: str,
    network: str,
    inventory: Path | None,
    state_dir: Path,
    metadata_file: Path | None,
    progress: str,
    insecure: tuple[str, ...],
    append: bool,
    annotations: tuple[str, ...],
    emulation: tuple[str, ...],
    labels: tuple[str, ...],
    native_wait: str | None,
    retries: int,
    allow_partial: bool,
    no_cache: bool,
    dry_run: bool,
    server: str | None,
    server_token: str | None,
) -> Outcome | None:
    """Build CONTEXT for every platform on the best node and push one index under each tag.

    Exit status: 0 pushed; 1 failed, nothing tagged; 2 bad input; 3 (--allow-partial) pushed
    without the platforms listed as missing; 130 cancelled.
    """
    from farm.api import BuildOptions, outcome_of
    from farm.build import read_request
    from farm.drain import DrainState
    from farm.inventory import load_inventory
    from farm.platforms import parse_platform_list
    from farm.progress import make_progress
    from farm.scheduler import parse_policy

    options = BuildOptions(
        tags=tags,
        platforms=tuple(parse_platform_list(platforms)) if platforms else (_this_platform(),),
        build_args=_parse_build_args(build_args),
        target=target,
        network=network,  # type: ignore[arg-type]  # click.Choice checked it
        insecure_registries=insecure,
        append=append,
        annotations=_parse_pairs(annotations, "--annotation"),
        policy=parse_policy(emulation=emulation, labels=labels, native_wait=native_wait),
        retries=retries,
        allow_partial=allow_partial,
        no_cache=no_cache,
    )
    where: Here | OnServer
    if server:  # the server builds, with its own inventory and queue
        where = OnServer(_server_options(click.get_current_context(), server, server_token, state_dir))
    else:
        where = Here(load_inventory(inventory), DrainState(state_dir).load())
    if dry_run:
        for decision in _run(_plan(options, where)):
            _print_decision(decision)
        return None

    renderer = make_progress(progress)

    async def read_and_build() -> BuildResult:
        request = await read_request(options, context, dockerfile)
        return await shared.run_build(request, where, renderer, lambda note: click.echo(note, err=True))

    try:
        result = _run(read_and_build())
    finally:
        renderer.close()
    _print_summary(result)
    if metadata_file is not None:
        metadata_file.write_text(json.dumps(result.metadata(), indent=2) + "\n")
    return outcome_of(result)


async def _plan(options: BuildOptions, where: Here | OnServer) -> list[Decision]:
    """``farm build --dry-run``: where each platform would build now, and why."""
    if isinstance(where, OnServer):
        from farm.serve import remote_plan

        return await remote_plan(where.server, options)
    from farm.build import dry_run
    from farm.pool import NodePool

    async with NodePool(where.inventory, drained=where.drained) as pool:
        return await dry_run(options, pool)


# --- farm serve (farm/serve) ---------------------------------------------------------------------


@cli.command()
@click.option(
    "--listen",
    default="127.0.0.1:8750",
    show_default=True,
    envvar="FARM_LISTEN",
    help="HOST:PORT to serve on ($FARM_LISTEN); loopback unless you say otherwise.",
)
@_INVENTORY_OPTION
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="FARM_STATE_DIR",
    default=STATE_DIR,
    show_default="~/.local/state/farm",
    help="The server's token, history, contexts and drained nodes ($FARM_STATE_DIR).",
)
@click.option(
    "--token",
    envvar="FARM_SERVE_TOKEN",
    help="The bearer token clients must send ($FARM_SERVE_TOKEN; default: STATE-DIR/token, made once).",
)
@click.option(
    "--max-builds",
    type=click.IntRange(min=1),
    help="Builds run at once; more wait in the queue (default: the inventory's slots in all).",
)
@click.option(
    "--probe-interval",
    default="15s",
    show_default=True,
    help="How often the nodes are probed for the status page and the metrics.",
)
@click.option(
    "--allow-registry",
    "allow_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="A registry builds may push to and pull bases from (repeatable); default: docker.io and the "
    "registries the server's docker config has credentials for. Builds naming others are refused.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Client connections at once; beyond, the one idle longest is closed, or the newcomer gets 503.",
)
@click.option(
    "--header-timeout",
    default="10s",
    show_default=True,
    help="How long a client may take to send a request's head (and may stay idle between requests).",
)
@click.option(
    "--store-limit",
    default="10GiB",
    show_default=True,
    help="Bytes of context files kept; uploads make room by evicting those no queued build needs.",
)
@click.option(
    "--allow-host-network",
    is_flag=True,
    help="Let builds ask for --network host: their RUN steps then reach whatever the nodes reach.",
)
def serve(
    listen: str,
    inventory: Path | None,
    state_dir: Path,
    token: str | None,
    max_builds: int | None,
    probe_interval: str,
    allow_registries: tuple[str, ...],
    max_connections: int,
    header_timeout: str,
    store_limit: str,
    allow_host_network: bool,
) -> None:
    """Serve builds to every client of a shared lab: API, queue, history, /metrics, status page.

    Stops cleanly on SIGTERM or Ctrl-C: what runs is stopped on every node, what waits fails.
    """
    from pydantic import ValidationError

    from farm.scheduler import parse_duration
    from farm.serve.app import ServeOptions, parse_size, serve  # aiohttp and prometheus-client only here
    from farm.serve.coordinator import CoordinatorOptions

    def parse() -> ServeOptions:
        try:
            return ServeOptions(
                listen=listen,
                inventory=inventory,
                state_dir=state_dir,
                token=token,
                coordinator=CoordinatorOptions(
                    max_builds=max_builds,
                    probe_interval=parse_duration(probe_interval, "--probe-interval"),
                    store_limit=parse_size(store_limit, "--store-limit"),
                    allow_host_network=allow_host_network,
                ),
                allow_registries=allow_registries,
                max_connections=max_connections,
                header_timeout=parse_duration(header_timeout, "--header-timeout"),
            )
        except ValidationError as exc:
            reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise InputError(f"bad farm serve options: {reason}") from exc

    options = parse()
    # The server's own news, and only its libraries' warnings (httpx logs every request at INFO).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("farm").setLevel(logging.INFO)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(options, stop, lambda url: click.echo(f"farm serve: listening on {url}", err=True))

    asyncio.run(main())


def _server_options(ctx: click.Context, url: str, token: str | None, state_dir: Path) -> ServerOptions:
    from farm.serve import ServerOptions, read_token

    if ctx.get_parameter_source("inventory") == click.core.ParameterSource.COMMANDLINE:
        raise InputError("--inventory has no effect with --server", hint="the server builds on its own nodes")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--server {url!r} is not an http(s) URL", hint="write http://HOST:PORT")
    token = token or read_token(state_dir / "token")
    if not token:
        raise InputError(
            f"no token for the farm server at {url}",
            hint=f"pass --server-token or set $FARM_SERVER_TOKEN (the server keeps it in its "
            f"state folder's 'token' file; {state_dir / 'token'} is not readable here)",
        )
    submitter = os.environ.get("FARM_SUBMITTER") or f"{getpass.getuser()}@{socket.gethostname()}"
    return ServerOptions(url=url, token=token, submitter=submitter)


# --- end farm serve --------------------------------------------------------------------------------


@cli.group()
def nodes() -> None:
    """List, check, add, remove, drain and undrain build nodes."""


@nodes.command("ls")
@_INVENTORY_OPTION
@_STATE_OPTION
@_JSON_OPTION
def nodes_ls(inventory: Path | None, state_dir: Path, as_json: bool) -> None:
    """List the inventory's nodes as configured (no connection is made)."""
    from farm.drain import DrainState
    from farm.inventory import load_inventory

    loaded = load_inventory(inventory)
    drained = DrainState(state_dir).load()
    rows: list[dict[str, object]] = [
        {
            "name": spec.name,
            "address": "local" if spec.local else _address(spec),
            "platforms": [str(p) for p in spec.platforms] if spec.platforms is not None else None,
            "emulation": spec.emulation,
            "slots": spec.slots,
            "builder": spec.builder,
            "labels": spec.labels,
            "drained": spec.name in drained,
        }
        for spec in loaded.nodes
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _table(
        ["NODE", "ADDRESS", "PLATFORMS", "EMULATION", "SLOTS", "BUILDER", "STATE"],
        [
            [
                spec.name,
                "local" if spec.local else _address(spec),
                ",".join(map(str, spec.platforms)) if spec.platforms is not None else "(probed)",
                "yes" if spec.emulation else "no",
                str(spec.slots),
                spec.builder,
                "drained" if spec.name in drained else "active",
            ]
            for spec in loaded.nodes
        ],
    )


@nodes.command("check")
@click.argument("names", nargs=-1)
@_INVENTORY_OPTION
@_STATE_OPTION
@_JSON_OPTION
@click.pass_context
def nodes_check(
    ctx: click.Context, names: tuple[str, ...], inventory: Path | None, state_dir: Path, as_json: bool
) -> None:
    """Probe every node (or NAMES) in parallel and say which can build what, and why not."""
    from farm.drain import DrainState
    from farm.inventory import load_inventory
    from farm.pool import check_nodes

    loaded = load_inventory(inventory)
    unknown = sorted(set(names) - {spec.name for spec in loaded.nodes})
    if unknown:
        raise InputError(f"no node named {', '.join(unknown)} in {loaded.source}")
    drained = DrainState(state_dir).load()
    checked = _run(check_nodes(loaded, drained, names))
    if as_json:
        click.echo(json.dumps([_node_report(node) for node in checked], indent=2))
    else:
        _table(
            [
                "NODE",
                "STATUS",
                "NATIVE",
                "EMULATES",
                "PYTHON",
                "CORES",
                "MEMORY",
                "DISK FREE",
                "BUILDER",
                "USER",
                "ISOLATION",
                "AGENT",
            ],
            [_node_row(node) for node in checked],
        )
        for node in checked:
            if node.problem is not None:
                click.echo(node.problem.message, err=True)
                if node.problem.hint:
                    click.echo(f"  hint: {node.problem.hint}", err=True)
    if any(node.problem is not None for node in checked):
        ctx.exit(1)  # each problem is said above


@nodes.command("add")
@click.argument("name")
@click.option("--host", required=True, help="Address or ~/.ssh/config alias of the node.")
@click.option("--port", type=int, help="SSH port (default 22 or as ~/.ssh/config says).")
@click.option("--user", help="SSH user.")
@click.option("--identity-file", type=click.Path(path_type=Path), help="SSH private key.")
@click.option("--proxy-jump", help="Bastion, as ssh -J takes it.")
@click.option("--slots", type=int, default=1, show_default=True, help="Concurrent builds on the node.")
@click.option("--no-emulation", is_flag=True, help="Never build foreign platforms on it under QEMU.")
@click.option("--workdir", help="Where the agent keeps its cache and builds on the node.")
@click.option(
    "--inventory",
    type=click.Path(path_type=Path),
    envvar="FARM_INVENTORY",
    required=True,
    help="The inventory file to add the node to ($FARM_INVENTORY).",
)
@click.option(
    "--known-hosts",
    type=click.Path(path_type=Path),
    default=FARM_KNOWN_HOSTS,
    show_default="~/.config/farm/known_hosts",
    help="Where to pin the node's host key.",
)
def nodes_add(
    name: str,
    host: str,
    port: int | None,
    user: str | None,
    identity_file: Path | None,
    proxy_jump: str | None,
    slots: int,
    no_emulation: bool,
    workdir: str | None,
    inventory: Path,
    known_hosts: Path,
) -> None:
    """Pin a new node's host key, check the node, and add it to the inventory."""
    from farm.inventory import Inventory, NodeSpec, append_node
    from farm.pool import check_nodes
    from farm.transport.ssh import fetch_host_key, pin_host_key  # asyncssh only when needed

    given = {
        "port": port,
        "user": user,
        "identity_file": str(identity_file) if identity_file else None,
        "proxy_jump": proxy_jump,
        "known_hosts": str(known_hosts) if known_hosts != FARM_KNOWN_HOSTS else None,
        "slots": slots,
        "emulation": False if no_emulation else None,
        "workdir": workdir,
    }
    entry: dict[str, object] = {"name": name, "host": host}
    entry.update({key: value for key, value in given.items() if value is not None})
    spec = NodeSpec.model_validate(entry)
    host_key = _run(fetch_host_key(spec))
    click.echo(f"{spec.host} presents {host_key.key.get_algorithm()} key {host_key.fingerprint}")
    if pin_host_key(host_key, known_hosts):
        click.echo(f"pinned it in {known_hosts}")
    single = Inventory(nodes=(spec,), source=str(inventory))
    checked = _run(check_nodes(single, frozenset(), ()))[0]
    if checked.problem is not None:
        raise checked.problem
    append_node(inventory, entry)
    assert checked.facts is not None
    click.echo(
        f"added {name} to {inventory}: {checked.facts.native_platform} natively, "
        f"{checked.facts.cores} cores, builder {checked.builder}"
    )


@nodes.command("rm")
@click.argument("name")
@click.option("--inventory", type=click.Path(path_type=Path), envvar="FARM_INVENTORY", required=True)
def nodes_rm(name: str, inventory: Path) -> None:
    """Remove a node from the inventory file."""
    from farm.inventory import remove_node

    remove_node(inventory, name)
    click.echo(f"removed {name} from {inventory}")


@nodes.command("drain")
@click.argument("name")
@_INVENTORY_OPTION
@_STATE_OPTION
def nodes_drain(name: str, inventory: Path | None, state_dir: Path) -> None:
    """Give a node no new builds (what runs on it finishes)."""
    _set_drained(name, inventory, state_dir, drained=True)


@nodes.command("undrain")
@click.argument("name")
@_INVENTORY_OPTION
@_STATE_OPTION
def nodes_undrain(name: str, inventory: Path | None, state_dir: Path) -> None:
    """Let a drained node take builds again."""
    _set_drained(name, inventory, state_dir, drained=False)


def _set_drained(name: str, inventory: Path | None, state_dir: Path, drained: bool) -> None:
    from farm.drain import DrainState
    from farm.inventory import load_inventory

    loaded = load_inventory(inventory)
    if all(spec.name != name for spec in loaded.nodes):
        raise InputError(f"no node named {name!r} in {loaded.source}", hint="see 'farm nodes ls'")
    changed = DrainState(state_dir).set(name, drained)
    state = "drained" if drained else "active"
    click.echo(f"{name} is {state}" + ("" if changed else " (it already was)"))


def _address(spec: NodeSpec) -> str:
    user = f"{spec.user}@" if spec.user else ""
    port = f":{spec.port}" if spec.port else ""
    return f"{user}{spec.host}{port}"


def _node_report(node: Node) -> dict[str, object]:
    facts = node.facts
    return {
        "name": node.name,
        "usable": node.usable,
        "drained": node.drained,
        "problem": node.problem.message if node.problem else None,
        "hint": node.problem.hint if node.problem else None,
        "builder": node.builder or None,
        "native": sorted(str(p) for p in facts.native_platforms) if facts and not node.problem else None,
        "emulated": sorted(str(p) for p in facts.emulated_platforms) if facts and not node.problem else None,
        "facts": facts.model_dump() if facts else None,
    }


def _node_row(node: Node) -> list[str]:
    facts = node.facts
    status = "ok" if node.usable else ("drained" if node.drained and not node.problem else "NOT USABLE")
    if facts is None:
        return [node.name, status, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"]
    try:
        native = ",".join(sorted(str(p) for p in facts.native_platforms))
        emulated = ",".join(sorted(str(p).removeprefix("linux/") for p in facts.emulated_platforms))
    except FarmError:
        native = emulated = f"? ({facts.machine})"
    return [
        node.name,
        status,
        native,
        emulated or "-",
        facts.python,
        str(facts.cores),
        f"{facts.memory_bytes / 2**30:.1f} GiB",
        f"{facts.disk_free_bytes / 2**30:.1f} GiB",
        node.builder or "-",
        _Warning(facts.user) if facts.runs_as_root else facts.user,
        _Warning(node.spec.isolation) if node.spec.isolation != "oci" else node.spec.isolation,
        facts.agent_version,
    ]


class _Warning(str):
    """A table cell shown in red on a terminal: containment weaker than farm's default."""


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def show(cell: str, width: int) -> str:
        text = str(cell).ljust(width)
        return click.style(text, fg="red") if isinstance(cell, _Warning) else text

    for row in [headers, *rows]:
        click.echo("  ".join(show(cell, width) for cell, width in zip(row, widths, strict=True)).rstrip())


@cli.group()
def imagetools() -> None:
    """Work with images and indexes already in a registry."""


@imagetools.command("create")
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "-t", "--tag", "tags", multiple=True, required=True, help="Where to push the index (repeatable)."
)
@click.option(
    "--append",
    is_flag=True,
    help="Start from what the first tag holds; replace only the platforms the sources bring.",
)
@click.option("--annotation", "annotations", multiple=True, help="Index annotation KEY=VALUE (repeatable).")
@click.option("--insecure-registry", "insecure", multiple=True, help="Talk plain HTTP to this HOST[:PORT].")
def imagetools_create(
    sources: tuple[str, ...],
    tags: tuple[str, ...],
    append: bool,
    annotations: tuple[str, ...],
    insecure: tuple[str, ...],
) -> None:
    """Merge images or indexes (SOURCES) into one index; their children are verified and copied."""
    from farm.imagetools import create_index
    from farm.registry.name import parse_reference

    parsed_tags = [parse_reference(tag) for tag in tags]
    parsed_sources = [parse_reference(source) for source in sources]
    pairs = _parse_pairs(annotations, "--annotation")
    index = _run(
        create_index(
            parsed_tags, parsed_sources, append=append, annotations=pairs, insecure_registries=insecure
        )
    )
    for tag in parsed_tags:
        click.echo(f"pushed {tag}@{index.digest}")


@imagetools.command("inspect")
@click.argument("reference")
@click.option("--raw", is_flag=True, help="Print the manifest's bytes as the registry stores them.")
@_JSON_OPTION
@click.option("--insecure-registry", "insecure", multiple=True, help="Talk plain HTTP to this HOST[:PORT].")
def imagetools_inspect(reference: str, raw: bool, as_json: bool, insecure: tuple[str, ...]) -> None:
    """Show what REFERENCE holds: platforms, digests, sizes and attestations."""
    from farm.imagetools import inspect
    from farm.registry.name import parse_reference

    ref = parse_reference(reference)
    seen = _run(inspect(ref, insecure))
    if raw:
        click.echo(seen.raw, nl=False)  # the exact bytes: their sha256 is the digest
        return
    children = [
        {
            "platform": str(child.descriptor.platform) if child.descriptor.platform else "unknown/unknown",
            "digest": child.descriptor.digest,
            "mediaType": child.descriptor.media_type,
            "size": child.descriptor.size,
            "imageSize": child.image_bytes,
            "attestationFor": child.descriptor.subject,
        }
        for child in seen.children
    ]
    if as_json:
        document: dict[str, object] = {
            "name": str(ref),
            "mediaType": seen.media_type,
            "digest": seen.digest,
            "manifests": children,
        }
        if seen.annotations:
            document["annotations"] = seen.annotations
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"Name:      {ref}")
    click.echo(f"MediaType: {seen.media_type}")
    click.echo(f"Digest:    {seen.digest}")
    for key, value in seen.annotations.items():
        click.echo(f"Annotation {key}={value}")
    if children:
        click.echo("Manifests:")
    for child in children:
        size = f"{child['imageSize']:,} bytes" if child["imageSize"] is not None else ""
        note = f"attestation for {child['attestationFor']}" if child["attestationFor"] else size
        click.echo(f"  {child['platform']:<16} {child['digest']}  {note}")


def _run(work: Coroutine[object, object, T]) -> T:
    """Run ``work``; SIGTERM cancels it like Ctrl-C does, so every node is told to stop."""

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await work

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def _this_platform() -> Platform:
    from farm.platforms import platform_from_machine

    return platform_from_machine(os.uname().machine)


def _parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, has_value, text = value.partition("=")
        if not key or not has_value:
            raise InputError(f"bad {option} {value!r}", hint="write KEY=VALUE")
        pairs[key] = text
    return pairs


def _parse_build_args(values: tuple[str, ...]) -> dict[str, str]:
    args = {}
    for value in values:
        key, has_value, text = value.partition("=")
        if not key:
            raise InputError(f"bad --build-arg {value!r}", hint="write KEY=VALUE")
        if not has_value:
            if key not in os.environ:
                continue  # as docker does: an unset KEY is simply not passed
            text = os.environ[key]
        args[key] = text
    return args


def _print_decision(decision: Decision) -> None:
    from farm.scheduler import Assign, Wait

    if isinstance(decision, Assign):
        click.echo(f"{decision.platform!s:<15} {decision.mode:<9} {decision.node:<12} {decision.reason}")
    elif isinstance(decision, Wait):
        click.echo(f"{decision.platform!s:<15} {'waits':<9} {'-':<12} {decision.reason}")
    else:
        hint = f" (hint: {decision.hint})" if decision.hint else ""
        click.echo(f"{decision.platform!s:<15} {'FAILS':<9} {'-':<12} {decision.message}{hint}")


def _print_summary(result: BuildResult) -> None:
    click.echo(f"{'PLATFORM':<16}{'NODE':<14}{'MODE':<10}{'SECONDS':>8}  DIGEST")
    for item in result.platforms:
        click.echo(f"{item.platform!s:<16}{item.node:<14}{item.mode:<10}{item.seconds:>8.1f}  {item.digest}")
    for platform, reason in result.missing.items():
        click.echo(f"{platform:<16}{'MISSING':<24}  {reason}")
    for tag in result.tags:
        click.echo(f"pushed {tag}@{result.index_digest}")


def _report(error: BaseException, debug: bool) -> int:
    """Say what ended the command, on stderr; return the exit code (see the module's doc)."""
    bug = bug_in(error)
    if bug is not None:
        traceback.print_exception(error if debug else bug)
        click.echo("farm: internal error (the traceback above is a bug; please report it)", err=True)
        return EXIT_BUG
    # No bug: each leaf is a FarmError or an interruption (KeyboardInterrupt, a cancelled task).
    leaves = error_leaves(error)
    failures = [leaf for leaf in leaves if isinstance(leaf, FarmError)]
    if len(failures) < len(leaves):
        click.echo("farm: interrupted; remote builds were stopped and nothing was tagged", err=True)
        return EXIT_CANCELLED
    if debug:
        traceback.print_exception(error)
    _explain(failures[0])
    return failures[0].exit_code


def _explain(error: FarmError) -> None:
    click.echo(f"error: {error.message}", err=True)
    if isinstance(error, BuildFailedError):
        for platform, failure in error.failures.items():
            click.echo(f"  {platform}: {failure.message}", err=True)
            if isinstance(failure, BuildError) and failure.log_tail:
                for line in failure.log_tail[-15:]:
                    click.echo(f"    | {line}", err=True)
            if failure.hint:
                click.echo(f"    hint: {failure.hint}", err=True)
    if error.hint:
        click.echo(f"hint: {error.hint}", err=True)


def main() -> None:
    """The ``farm`` executable: click parses, ``_FarmGroup.invoke`` decides the exit code."""
    cli.main(prog_name="farm")
