"""The server's build queue: fair between submitters, first come first served within one.

Pure: no clock, no I/O. Each submitter has a lane; ``pop`` takes the head of the first lane and
sends that lane to the back, so a CI pipeline that submits fifty builds does not make a person's
one build wait behind all fifty: it waits for at most one build of each other submitter.
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["FairQueue"]


class FairQueue:
    """Build ids in lanes by submitter, served round-robin."""

    def __init__(self) -> None:
        self._lanes: OrderedDict[str, deque[str]] = OrderedDict()
        self._lane_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._lane_of)

    def __contains__(self, item: object) -> bool:
        return item in self._lane_of

    def push(self, submitter: str, item: str) -> None:
        if item in self._lane_of:
            raise ValueError(f"{item} is queued already")
        self._lanes.setdefault(submitter, deque()).append(item)
        self._lane_of[item] = submitter

    def pop(self) -> str | None:
        """The next build to run, or None when nothing waits."""
        if not self._lanes:
            return None
        submitter, lane = next(iter(self._lanes.items()))
        item = lane.popleft()
        del self._lane_of[item]
        if lane:
            self._lanes.move_to_end(submitter)
        else:
            del self._lanes[submitter]
        return item

    def remove(self, item: str) -> bool:
        """Take ``item`` out of the queue (cancelled); False if it was not queued."""
        submitter = self._lane_of.pop(item, None)
        if submitter is None:
            return False
        lane = self._lanes[submitter]
        lane.remove(item)
        if not lane:
            del self._lanes[submitter]
        return True

    def position(self, item: str) -> int:
        """How many builds ``pop`` gives before ``item`` (0: it is next)."""
        submitter = self._lane_of[item]
        depth = self._lanes[submitter].index(item)
        ahead = 0
        before_its_lane = True
        for name, lane in self._lanes.items():
            if name == submitter:
                before_its_lane = False
                continue
            # Each round serves one of every lane, in lane order: lanes ahead of its own are served
            # once more in the round in which ``item`` comes out.
            ahead += min(len(lane), depth + 1 if before_its_lane else depth)
        return ahead + depth

    def items(self) -> list[str]:
        """Everything queued, in the order ``pop`` would give it."""
        order = sorted(self._lane_of, key=self.position)
        return order
