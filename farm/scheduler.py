"""Which node builds which platform, and why: native hardware first, QEMU only where allowed.

Pure: no I/O and no clock here. The orchestration describes the farm as it is now (one
``NodeView`` per node: facts, health, free slots, labels), the user's ``Policy`` and the recent
``History``, passes ``now``, and gets back one ``Decision`` per ``Request``: ``Assign`` (a node and
a mode), ``Wait`` (until a slot frees, a node is due back, or the native wait is over) or ``Fail``.
Every decision carries a reason a user can read; ``farm build --dry-run`` prints ``plan``'s.

The rules ``decide`` applies, in order (they are the issue's, plus the ones it left open):

1. Only nodes the request may use count: not in ``excluded`` (they failed it already), carrying
   every ``--label``. A node takes work only if it is ``up`` with a free slot.
2. A free native node is assigned, whatever any emulating node offers. Among several: the node
   that last built this context for this platform (warm cache), then the highest speed, then the
   lowest load (busy / slots), then inventory order.
3. While a native node may soon take it (busy, or down/quarantined and so due back after a
   probe) and the request has waited less than ``native_wait``, it waits.
4. Else a free emulating node is assigned, if the policy allows emulating this platform and the
   node allows emulation at all; ranked as in rule 2.
5. Else, if a usable node is merely busy (native, or emulating where allowed), it waits for a
   slot without a deadline: a busy node always frees up. Down nodes are waited for only within
   ``native_wait`` (rule 3): they may never come back.
6. Else it fails, naming the platform and what would have served it.

Draining and cordoned nodes are never waited for: only an operator brings them back.

``farm.dispatch`` asks ``decide`` about each waiting platform of a build, and asks again when a
build ends, a node fails or a wait is due.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from farm.errors import InputError, PlanError, PlatformError
from farm.health import State
from farm.platforms import Platform, parse_platform

__all__ = [
    "DEFAULT_NATIVE_WAIT",
    "Assign",
    "Decision",
    "Fail",
    "History",
    "Mode",
    "NodeView",
    "Policy",
    "Request",
    "Rule",
    "Wait",
    "affinity_key",
    "decide",
    "format_duration",
    "parse_duration",
    "parse_policy",
    "plan",
]

Mode = Literal["native", "emulated"]
Rule = Literal["allow", "deny"]

# (affinity key, platform) -> the node that last built that context for that platform.
History = Mapping[tuple[str, Platform], str]

DEFAULT_NATIVE_WAIT = 300.0  # seconds: emulation is many times slower, a native slot is worth a wait

_LISTED = 5  # nodes named in a reason before "and N more"


# --- What the scheduler is given ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """One node as the scheduler sees it now."""

    name: str
    native: frozenset[Platform]
    emulated: frozenset[Platform] = frozenset()
    emulation_allowed: bool = True  # the inventory's per-node switch
    slots: int = 1
    busy: int = 0
    state: State = "up"
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    speed: float = 1.0  # relative build speed; higher is better
    back_at: float | None = None  # a down/quarantined node's next probe (``NodeHealth.back_at``)

    # The platforms again, spelled as strings: a ``str`` caches its hash and a ``Platform`` does
    # not, and ``decide`` looks every node up for every request (a third of its time on a farm of
    # 200 nodes before this).
    _native_keys: frozenset[str] = field(init=False, repr=False, compare=False, hash=False)
    _emulated_keys: frozenset[str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.busy < 0:
            raise ValueError(f"{self.name}: a node has at least one slot and no negative load")
        object.__setattr__(self, "_native_keys", frozenset(str(p) for p in self.native))
        object.__setattr__(self, "_emulated_keys", frozenset(str(p) for p in self.emulated))

    @property
    def free(self) -> bool:
        """Whether it can take work now: up, with a slot free."""
        return self.state == "up" and self.busy < self.slots


@dataclass(frozen=True)
class Request:
    """One platform of one build, waiting for a node."""

    platform: Platform
    affinity: str | None = None  # see ``affinity_key``; None: no cache to be near
    excluded: frozenset[str] = frozenset()  # nodes that failed this platform of this build
    waiting_since: float = 0.0  # when it first asked, on the clock of ``now``


def affinity_key(*digests: str) -> str:
    """The cache-affinity key of a build: its context digest and Dockerfile digest, say."""
    return "+".join(digests)


class Policy(BaseModel):
    """What the user allows: emulation (by default and per platform), labels, the native wait."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    emulation: Rule = "allow"
    allow: frozenset[Platform] = Field(default=frozenset(), description="emulation allowed for these")
    deny: frozenset[Platform] = Field(default=frozenset(), description="emulation denied for these")
    native_wait: float = Field(default=DEFAULT_NATIVE_WAIT, ge=0, description="seconds")
    labels: dict[str, str] = Field(default_factory=dict, description="a node must carry all of them")

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _parse_platforms(cls, value: Any) -> Any:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            return value
        try:
            return frozenset(parse_platform(item) if isinstance(item, str) else item for item in value)
        except PlatformError as exc:
            raise ValueError(exc.message) from exc

    @field_serializer("allow", "deny")
    def _spell_platforms(self, platforms: frozenset[Platform]) -> list[str]:
        # As the CLI spells them, so ``model_validate(policy.model_dump() | overrides)`` works.
        return sorted(str(p) for p in platforms)

    @model_validator(mode="after")
    def _allow_or_deny(self) -> Policy:
        both = self.allow & self.deny
        if both:
            raise ValueError(f"emulation is both allowed and denied for {_platforms(both)}")
        return self

    def allows_emulation(self, platform: Platform) -> bool:
        if platform in self.deny:
            return False
        return platform in self.allow or self.emulation == "allow"

    def admits(self, labels: Mapping[str, str]) -> bool:
        return self.missing_label(labels) is None

    def missing_label(self, labels: Mapping[str, str]) -> str | None:
        for key, value in self.labels.items():
            if labels.get(key) != value:
                return f"{key}={value}"
        return None


# --- What it decides ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    platform: Platform
    node: str
    mode: Mode
    reason: str


@dataclass(frozen=True)
class Wait:
    platform: Platform
    reason: str
    # Decide again then at the latest (the native wait ends, a node is due for a probe); None:
    # only an event (a build ends, a probe passes) can change the answer.
    retry_at: float | None


@dataclass(frozen=True)
class Fail:
    platform: Platform
    message: str
    hint: str | None

    def error(self) -> PlanError:
        return PlanError(self.message, hint=self.hint)


Decision = Assign | Wait | Fail


# --- Deciding ----------------------------------------------------------------------------------

# Why a node can or cannot take a request, most fundamental first.
_Standing = Literal["off", "excluded", "unlabelled", "held", "back", "busy", "free"]


class _Seen(NamedTuple):
    """A node able to build the platform (natively or emulated), and where it stands."""

    position: int
    node: NodeView
    standing: _Standing
    missing_label: str | None = None


def decide(
    request: Request,
    nodes: Sequence[NodeView],
    policy: Policy,
    history: History,
    now: float,
) -> Decision:
    """Where ``request`` goes now, or why it waits or fails; the rules are in the module docstring."""
    platform = request.platform
    key = str(platform)
    native: list[_Seen] = []
    emulators: list[_Seen] = []
    excluded, labelled = request.excluded, bool(policy.labels)
    # Where each node able to build the platform stands, most fundamental reason first. Inline
    # rather than a function per node: this loop is most of the scheduler's time.
    for position, node in enumerate(nodes):
        if key in node._native_keys:
            seen = native
        elif key in node._emulated_keys:
            seen = emulators
            if not node.emulation_allowed:
                seen.append(_Seen(position, node, "off"))
                continue
        else:
            continue
        missing = policy.missing_label(node.labels) if labelled else None
        standing: _Standing
        if node.name in excluded:
            standing = "excluded"
        elif missing is not None:
            standing = "unlabelled"
        elif node.state == "up":
            standing = "free" if node.busy < node.slots else "busy"
        elif node.state in ("draining", "cordoned"):
            standing = "held"
        else:
            standing = "back"
        seen.append(_Seen(position, node, standing, missing))
    affine = history.get((request.affinity, platform)) if request.affinity is not None else None

    free_native = [seen for seen in native if seen.standing == "free"]
    if free_native:
        chosen, why = _best(free_native, affine, "native", platform)
        reason = f"{chosen.name} runs {platform} natively{why}"
        return Assign(
            platform, chosen.name, "native", reason + _cache_note(affine, chosen, native, emulators, now)
        )

    emulation_allowed = policy.allows_emulation(platform)
    usable_emulators = emulators if emulation_allowed else []
    coming = [seen for seen in native if seen.standing in ("busy", "back")]
    deadline = request.waiting_since + policy.native_wait
    if coming and now < deadline:
        return _wait_for_native(request, coming, usable_emulators, policy, deadline, now)

    free_emulators = [seen for seen in usable_emulators if seen.standing == "free"]
    if free_emulators:
        chosen, why = _best(free_emulators, affine, "emulating", platform)
        reason = f"{chosen.name} emulates {platform} with QEMU: {_why_not_native(native, policy, now)}{why}"
        return Assign(
            platform, chosen.name, "emulated", reason + _cache_note(affine, chosen, native, emulators, now)
        )

    busy = [seen for seen in native + usable_emulators if seen.standing == "busy"]
    if busy:
        return Wait(platform, f"waiting for a free slot: {_statuses(busy, now)}", None)
    return _fail(platform, native, emulators, nodes, policy, now)


def plan(
    requests: Sequence[Request],
    nodes: Sequence[NodeView],
    policy: Policy,
    history: History,
    now: float,
) -> list[Decision]:
    """``decide`` each request in turn, as if each assignment started at once (``--dry-run``)."""
    views = list(nodes)
    position = {view.name: index for index, view in enumerate(views)}
    decisions: list[Decision] = []
    for request in requests:
        decision = decide(request, views, policy, history, now)
        if isinstance(decision, Assign):
            index = position[decision.node]
            views[index] = replace(views[index], busy=views[index].busy + 1)
        decisions.append(decision)
    return decisions


def _rank(seen: _Seen, affine: str | None) -> tuple[bool, float, float, int]:
    node = seen.node
    return (node.name != affine, -node.speed, node.busy / node.slots, seen.position)


def _best(pool: list[_Seen], affine: str | None, kind: str, platform: Platform) -> tuple[NodeView, str]:
    """The best of ``pool`` and, after "; ", the criterion that set it apart (empty if alone)."""
    ranked = sorted(pool, key=lambda seen: _rank(seen, affine))
    chosen = ranked[0].node
    if chosen.name == affine:
        return chosen, f"; it built this context for {platform} last (warm cache)"
    if len(ranked) == 1:
        return chosen, ""
    first, second = _rank(ranked[0], affine), _rank(ranked[1], affine)
    count = f"{len(ranked)} free {kind} nodes"
    if first[1] != second[1]:
        return chosen, f"; fastest of {count} (speed {chosen.speed:g})"
    if first[2] != second[2]:
        return chosen, f"; least loaded of {count} ({chosen.busy}/{chosen.slots} slots busy)"
    return chosen, f"; first in the inventory of {count} equally suited"


def _cache_note(
    affine: str | None, chosen: NodeView, native: list[_Seen], emulators: list[_Seen], now: float
) -> str:
    """Why the node with the warm cache was not chosen, when there is one."""
    if affine is None or affine == chosen.name:
        return ""
    for seen in native + emulators:
        if seen.node.name == affine:
            why = "would emulate it" if seen.standing == "free" else _status(seen, now)
            return f" ({affine} has the warm cache but {why})"
    return f" ({affine} has the warm cache but cannot build it now)"


def _wait_for_native(
    request: Request,
    coming: list[_Seen],
    emulators: list[_Seen],
    policy: Policy,
    deadline: float,
    now: float,
) -> Wait:
    platform = request.platform
    fallback = [seen for seen in emulators if seen.standing in ("free", "busy")]
    if fallback:
        then = f", then {_names(seen.node.name for seen in fallback)} may emulate it"
    elif not policy.allows_emulation(platform):
        then = f" (emulation is denied for {platform})"
    else:
        then = " (no node can emulate it)"
    left = f"{format_duration(deadline - now)} left of --native-wait {format_duration(policy.native_wait)}"
    times = [
        seen.node.back_at for seen in coming if seen.node.back_at is not None and seen.node.back_at > now
    ]
    if math.isfinite(deadline):
        times.append(deadline)
    reason = f"waiting for a native node: {_statuses(coming, now)}; {left}{then}"
    return Wait(platform, reason, min(times) if times else None)


def _why_not_native(native: list[_Seen], policy: Policy, now: float) -> str:
    if not native:
        return "no node runs it natively"
    reason = f"no native node is free ({_statuses(native, now)})"
    if any(seen.standing in ("busy", "back") for seen in native):
        reason += f" and --native-wait {format_duration(policy.native_wait)} is over"
    return reason


def _fail(
    platform: Platform,
    native: list[_Seen],
    emulators: list[_Seen],
    nodes: Sequence[NodeView],
    policy: Policy,
    now: float,
) -> Fail:
    if not native and not emulators:
        return Fail(platform, f"no node can build {platform}", _describe_farm(nodes, platform))
    parts: list[str] = []
    hints: list[str] = []
    if native:
        parts.append(_statuses(native, now, prefix="runs it natively but "))
    else:
        parts.append("no node runs it natively")
    if emulators and not policy.allows_emulation(platform):
        parts.append("emulation is denied for it")
        able = [seen.node.name for seen in emulators if seen.standing not in ("off", "excluded")]
        if able:
            parts.append(f"{_names(able)} could emulate it")
            hints.append(f"allow it with --emulation allow={platform}")
    elif emulators:
        parts.append(_statuses(emulators, now, prefix="could emulate it but "))
    standings = {seen.standing for seen in native + emulators}
    if "unlabelled" in standings:
        wanted = ",".join(f"{key}={value}" for key, value in policy.labels.items())
        hints.append(f"only nodes labelled {wanted} are used: change or drop --label")
    held = {seen.node.state for seen in native + emulators if seen.standing == "held"}
    if "draining" in held:
        hints.append("a drained node takes work again once undrained ('farm nodes undrain')")
    if "cordoned" in held:
        hints.append("a cordoned node takes work again once uncordoned")
    if "back" in standings:
        hints.append("a longer --native-wait waits for a down or quarantined node to come back")
    if "off" in standings:
        hints.append("set 'emulation: true' for a node in the inventory to let it emulate")
    return Fail(platform, f"{platform}: " + "; ".join(parts), "; ".join(hints) or None)


def _describe_farm(nodes: Sequence[NodeView], platform: Platform) -> str:
    add = (
        f"add a node that runs {platform} natively, or register its QEMU handler on one (deploy/lab/setup.sh)"
    )
    if not nodes:
        return f"the farm has no usable node; {add}"
    native: dict[Platform, list[str]] = {}
    emulated: dict[Platform, list[str]] = {}
    for node in nodes:
        for p in node.native:
            native.setdefault(p, []).append(node.name)
        for p in node.emulated - node.native:
            emulated.setdefault(p, []).append(node.name)
    parts = []
    for kind, table in (("natively", native), ("under QEMU", emulated)):
        if table:
            listed = ", ".join(f"{p} ({_names(table[p])})" for p in sorted(table))
            parts.append(f"{kind}: {listed}")
    return f"the farm builds {'; '.join(parts) or 'nothing'}; {add}"


def _status(seen: _Seen, now: float) -> str:
    node = seen.node
    if seen.standing == "off":
        return "has emulation off"
    if seen.standing == "excluded":
        return "failed it already"
    if seen.standing == "unlabelled":
        return f"lacks label {seen.missing_label}"
    if seen.standing == "held":
        return f"is {node.state}"
    if seen.standing == "back":
        if node.back_at is not None and node.back_at > now:
            return f"is {node.state} (next probe in {format_duration(node.back_at - now)})"
        return f"is {node.state} (probe due)"
    # Busy: a free node is assigned, never described (``_cache_note`` words that case itself).
    return f"is busy ({node.busy}/{node.slots} slots)"


def _statuses(seen: list[_Seen], now: float, prefix: str = "") -> str:
    shown = [f"{item.node.name} {prefix}{_status(item, now)}" for item in seen[:_LISTED]]
    if len(seen) > _LISTED:
        shown.append(f"and {len(seen) - _LISTED} more")
    return ", ".join(shown)


def _names(names: Iterable[str]) -> str:
    listed = list(names)
    shown = listed[:_LISTED]
    if len(listed) > _LISTED:
        shown.append(f"{len(listed) - _LISTED} more")
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " and " + shown[-1]


def _platforms(platforms: Iterable[Platform]) -> str:
    return ", ".join(str(p) for p in sorted(platforms))


# --- The CLI's spellings -----------------------------------------------------------------------

_EMULATION_HINT = (
    "write --emulation allow or --emulation deny for every platform, and allow=PLATFORM or "
    "deny=PLATFORM for one (repeatable; a comma list works too: deny=linux/s390x,linux/ppc64le)"
)
_DURATION_HINT = "write a duration such as 90s, 5m, 1h30m or 1.5m, or 0 to never wait"
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_policy(
    emulation: Iterable[str] = (),
    labels: Iterable[str] = (),
    native_wait: str | None = None,
) -> Policy:
    """A ``Policy`` from the repeatable ``--emulation`` and ``--label`` values and ``--native-wait``."""
    default, rules = _parse_emulation(emulation)
    return Policy(
        emulation=default or "allow",
        allow=frozenset(p for p, rule in rules.items() if rule == "allow"),
        deny=frozenset(p for p, rule in rules.items() if rule == "deny"),
        native_wait=DEFAULT_NATIVE_WAIT if native_wait is None else parse_duration(native_wait),
        labels=_parse_labels(labels),
    )


def _parse_emulation(values: Iterable[str]) -> tuple[Rule | None, dict[Platform, Rule]]:
    default: Rule | None = None
    rules: dict[Platform, Rule] = {}
    for value in values:
        rule: Rule | None = None  # the allow=/deny= that a bare platform in a comma list continues
        for raw in value.split(","):
            word, equals, text = raw.partition("=")
            verb = _rule(word)
            if not equals and verb is not None:
                if default not in (None, verb):
                    raise InputError(
                        "--emulation says both allow and deny for every platform", hint=_EMULATION_HINT
                    )
                default, rule = verb, None
                continue
            if equals:
                if verb is None:
                    raise InputError(
                        f"--emulation {value!r}: {word.strip()!r} is neither allow nor deny",
                        hint=_EMULATION_HINT,
                    )
                rule = verb
            elif rule is None:
                raise InputError(
                    f"--emulation {value!r}: {raw.strip()!r} needs allow= or deny= before it",
                    hint=_EMULATION_HINT,
                )
            else:
                text = raw
            try:
                platform = parse_platform(text)
            except PlatformError as exc:
                raise PlatformError(f"--emulation {value!r}: {exc.message}", hint=exc.hint) from exc
            if rules.get(platform, rule) != rule:
                raise InputError(f"--emulation both allows and denies {platform}", hint=_EMULATION_HINT)
            rules[platform] = rule
    return default, rules


def _rule(word: str) -> Rule | None:
    spelled = word.strip().lower()
    if spelled == "allow":
        return "allow"
    if spelled == "deny":
        return "deny"
    return None


def _parse_labels(values: Iterable[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, equals, label = item.partition("=")
            key, label = key.strip(), label.strip()
            if not equals or not key or any(c.isspace() for c in key):
                raise InputError(
                    f"--label {value!r}: expected key=value",
                    hint="e.g. --label rack=b2 (repeatable); a node is used only if it has every label",
                )
            if labels.get(key, label) != label:
                raise InputError(
                    f"--label gives {key} two values: {labels[key]!r} and {label!r}",
                    hint="a node has one value per label: give each key once",
                )
            labels[key] = label
    return labels


def parse_duration(text: str, option: str = "--native-wait") -> float:
    """Seconds from ``90s``, ``5m``, ``1h30m``, ``250ms``, ``1.5m`` or ``0`` (Go's spelling)."""
    spelled = text.strip().lower()
    if spelled == "0":
        return 0.0
    if not _DURATION.fullmatch(spelled):
        raise InputError(f"{option} {text!r} is not a duration", hint=_DURATION_HINT)
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(spelled))


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``, ``300`` -> ``5m``, ``0.25`` -> ``0.25s``: what a reason shows."""
    if math.isinf(seconds):
        return "forever"
    if seconds < 59.5 and seconds != round(seconds):
        return f"{seconds:.3g}s"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"
