"""The ``farm`` command line: parse options into models, call one function, print its result.

This is the only place that turns farm's typed errors into messages and exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import NoReturn, TypeVar

import click

from farm.build import BuildOptions, BuildResult, run_build
from farm.errors import BuildError, BuildFailedError, FarmError, InputError
from farm.inventory import load_inventory
from farm.platforms import Platform, parse_platform_list, platform_from_machine
from farm.progress import make_progress

__all__ = ["main"]

T = TypeVar("T")
_BUG_EXIT = 70  # EX_SOFTWARE: farm itself failed


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="farm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build multi-platform container images on native nodes, with QEMU only by policy."""
    ctx.obj = {"debug": debug}


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
    "--inventory",
    type=click.Path(path_type=Path),
    envvar="FARM_INVENTORY",
    help="Node inventory (default: $FARM_INVENTORY, else this machine).",
)
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
@click.pass_context
def build(
    ctx: click.Context,
    context: Path,
    tags: tuple[str, ...],
    platforms: tuple[str, ...],
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    target: str,
    inventory: Path | None,
    metadata_file: Path | None,
    progress: str,
    insecure: tuple[str, ...],
) -> None:
    """Build CONTEXT for every platform on the best node and push one index under each tag."""

    def parse() -> BuildOptions:
        return BuildOptions(
            context=context,
            dockerfile=dockerfile,
            tags=tags,
            platforms=tuple(parse_platform_list(platforms)) if platforms else (_this_platform(),),
            build_args=_parse_build_args(build_args),
            target=target,
            insecure_registries=insecure,
        )

    options = _guard(ctx, parse)
    nodes = _guard(ctx, lambda: load_inventory(inventory))
    renderer = make_progress(progress)
    try:
        result = _guard(ctx, lambda: _run(run_build(options, nodes, renderer)))
    finally:
        renderer.close()
    _print_summary(result)
    if metadata_file is not None:
        metadata_file.write_text(json.dumps(result.metadata(), indent=2) + "\n")


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
    return platform_from_machine(os.uname().machine)


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


def _print_summary(result: BuildResult) -> None:
    click.echo(f"{'PLATFORM':<16}{'NODE':<14}{'MODE':<10}{'SECONDS':>8}  DIGEST")
    for item in result.platforms:
        click.echo(f"{item.platform!s:<16}{item.node:<14}{item.mode:<10}{item.seconds:>8.1f}  {item.digest}")
    for tag in result.tags:
        click.echo(f"pushed {tag}@{result.index_digest}")


def _guard(ctx: click.Context, call: Callable[[], T]) -> T:
    """Run ``call``; turn a farm error into a message and its exit code, anything else into a bug."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        return call()
    except* FarmError as group:
        error = _first(group)
        if debug:
            traceback.print_exception(error)
        _fail(error)
    except* KeyboardInterrupt:
        click.echo("farm: interrupted; remote builds were stopped and nothing was tagged", err=True)
        sys.exit(130)
    raise AssertionError("unreachable")


def _first(group: BaseExceptionGroup[FarmError]) -> FarmError:
    leaves = [exc for exc in _leaves(group) if isinstance(exc, FarmError)]
    return leaves[0]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _fail(error: FarmError) -> NoReturn:
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
    sys.exit(error.exit_code)


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        click.echo("farm: internal error (the traceback above is a bug; please report it)", err=True)
        sys.exit(_BUG_EXIT)
