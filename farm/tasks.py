"""Concurrent work with an owner: ``asyncio.TaskGroup``, with the errors farm's callers expect.

``asyncio.gather`` leaves siblings running when one fails (a registry client then closes under
them); a TaskGroup cancels and awaits them. Its failure is a group, though, where callers catch a
``RegistryError``: ``FarmTaskGroup`` raises the first farm error alone when only farm errors
failed, as ``gather`` did, and the whole group when a bug is among them, so that no bug hides
behind a registry error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from farm.errors import FarmError, error_leaves

__all__ = ["FarmTaskGroup", "run_all"]

T = TypeVar("T")


class FarmTaskGroup:
    """An ``asyncio.TaskGroup`` that fails with the first farm error when only farm errors failed."""

    def __init__(self) -> None:
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> asyncio.TaskGroup:
        return await self._group.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._group.__aexit__(*exc_info)
        except BaseExceptionGroup as failed:
            leaves = error_leaves(failed)
            if not all(isinstance(leaf, FarmError) for leaf in leaves):
                raise
            first = leaves[0]
        else:
            return
        raise first


async def run_all(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coroutines`` concurrently in a ``FarmTaskGroup``; their results, in order."""
    async with FarmTaskGroup() as group:
        tasks = [group.create_task(coroutine) for coroutine in coroutines]
    return [task.result() for task in tasks]
