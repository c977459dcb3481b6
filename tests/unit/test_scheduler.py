"""farm.scheduler: native hardware first, QEMU only by policy, every choice explained.

The pure core: ``decide``, ``plan``, ``Policy``, and the duration spellings.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from farm.errors import InputError, PlanError, PlatformError
from farm.health import State
from farm.platforms import Platform
from farm.scheduler import (
    DEFAULT_NATIVE_WAIT,
    Assign,
    Fail,
    NodeView,
    Policy,
    Request,
    Wait,
    affinity_key,
    decide,
    format_duration,
    parse_duration,
    parse_policy,
    plan,
)

_SETTINGS = settings(database=None, deadline=None, max_examples=50)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
S390X = Platform("linux", "s390x")
PPC64LE = Platform("linux", "ppc64le")


# --- The pure core: decide, plan, Policy ---------------------------------------------------------

RISCV = Platform("linux", "riscv64")
I386 = Platform("linux", "386")
ALLOW = Policy(native_wait=300.0)
DENY = Policy(emulation="deny", native_wait=300.0)
NO_WAIT = Policy(native_wait=0.0)


def view(
    name: str,
    native: Iterable[Platform] = (),
    emulated: Iterable[Platform] = (),
    *,
    slots: int = 1,
    busy: int = 0,
    state: State = "up",
    labels: dict[str, str] | None = None,
    speed: float = 1.0,
    emulation: bool = True,
    back_at: float | None = None,
) -> NodeView:
    return NodeView(
        name,
        frozenset(native),
        frozenset(emulated),
        emulation_allowed=emulation,
        slots=slots,
        busy=busy,
        state=state,
        labels=labels or {},
        speed=speed,
        back_at=back_at,
    )


def ask(
    platform: Platform,
    *,
    affinity: str | None = None,
    excluded: Iterable[str] = (),
    since: float = 0.0,
) -> Request:
    return Request(platform, affinity, frozenset(excluded), since)


def test_a_free_native_node_is_assigned() -> None:
    pi = view("pi", [ARM64])
    assert decide(ask(ARM64), [pi], ALLOW, {}, 0.0) == Assign(
        ARM64, "pi", "native", "pi runs linux/arm64 natively"
    )


def test_native_wins_over_an_idle_fast_emulator_with_the_warm_cache() -> None:
    x86 = view("x86", [AMD64], [ARM64], slots=64, speed=10.0)
    pi = view("pi", [ARM64], slots=2, busy=1)
    decision = decide(ask(ARM64, affinity="ctx"), [x86, pi], ALLOW, {("ctx", ARM64): "x86"}, 0.0)
    assert decision == Assign(
        ARM64,
        "pi",
        "native",
        "pi runs linux/arm64 natively (x86 has the warm cache but would emulate it)",
    )


def test_rank_affinity_first() -> None:
    nodes = [view("a", [ARM64], speed=3.0), view("b", [ARM64], slots=2, busy=1), view("c", [ARM64])]
    decision = decide(ask(ARM64, affinity="ctx"), nodes, ALLOW, {("ctx", ARM64): "b"}, 0.0)
    assert decision == Assign(
        ARM64,
        "b",
        "native",
        "b runs linux/arm64 natively; it built this context for linux/arm64 last (warm cache)",
    )


def test_affinity_is_per_platform_and_per_key() -> None:
    nodes = [view("a", [ARM64]), view("b", [ARM64])]
    history = {("ctx", AMD64): "b", ("other", ARM64): "b"}
    assert decide(ask(ARM64, affinity="ctx"), nodes, ALLOW, history, 0.0).node == "a"  # type: ignore[union-attr]
    # No affinity key: history is not consulted.
    assert decide(ask(ARM64), nodes, ALLOW, {("ctx", ARM64): "b"}, 0.0).node == "a"  # type: ignore[union-attr]


def test_rank_speed_second() -> None:
    nodes = [view("a", [ARM64]), view("b", [ARM64], speed=2.5, slots=4, busy=3), view("c", [ARM64])]
    assert decide(ask(ARM64), nodes, ALLOW, {}, 0.0) == Assign(
        ARM64, "b", "native", "b runs linux/arm64 natively; fastest of 3 free native nodes (speed 2.5)"
    )


def test_rank_load_third() -> None:
    nodes = [
        view("a", [ARM64], slots=2, busy=1),
        view("b", [ARM64], slots=4, busy=1),
        view("c", [ARM64], slots=2, busy=1),
    ]
    assert decide(ask(ARM64), nodes, ALLOW, {}, 0.0) == Assign(
        ARM64,
        "b",
        "native",
        "b runs linux/arm64 natively; least loaded of 3 free native nodes (1/4 slots busy)",
    )


def test_rank_inventory_order_last() -> None:
    nodes = [view("b", [ARM64]), view("a", [ARM64])]
    assert decide(ask(ARM64), nodes, ALLOW, {}, 0.0) == Assign(
        ARM64,
        "b",
        "native",
        "b runs linux/arm64 natively; first in the inventory of 2 free native nodes equally suited",
    )


@pytest.mark.parametrize(
    ("affine_node", "note"),
    [
        (view("b", [ARM64], busy=1), "b has the warm cache but is busy (1/1 slots)"),
        (view("b", [ARM64], state="draining"), "b has the warm cache but is draining"),
        (
            view("b", [ARM64], state="down", back_at=30.0),
            "b has the warm cache but is down (next probe in 20s)",
        ),
        (
            view("b", [ARM64], state="quarantined", back_at=5.0),
            "b has the warm cache but is quarantined (probe due)",
        ),
        (view("b", [AMD64]), "b has the warm cache but cannot build it now"),
    ],
)
def test_why_the_warm_cache_was_not_used(affine_node: NodeView, note: str) -> None:
    decision = decide(
        ask(ARM64, affinity="k"), [view("a", [ARM64]), affine_node], ALLOW, {("k", ARM64): "b"}, 10.0
    )
    assert decision == Assign(ARM64, "a", "native", f"a runs linux/arm64 natively ({note})")


def test_the_warm_cache_is_named_when_emulating_too() -> None:
    nodes = [view("x1", [AMD64], [S390X]), view("x2", [AMD64], [S390X], busy=1)]
    assert decide(ask(S390X, affinity="k"), nodes, ALLOW, {("k", S390X): "x2"}, 0.0) == Assign(
        S390X,
        "x1",
        "emulated",
        "x1 emulates linux/s390x with QEMU: no node runs it natively "
        "(x2 has the warm cache but is busy (1/1 slots))",
    )
    nodes = [view("x1", [AMD64], [S390X]), view("x2", [AMD64], [S390X])]
    assert decide(ask(S390X, affinity="k"), nodes, ALLOW, {("k", S390X): "x2"}, 0.0) == Assign(
        S390X,
        "x2",
        "emulated",
        "x2 emulates linux/s390x with QEMU: no node runs it natively; "
        "it built this context for linux/s390x last (warm cache)",
    )


def test_a_busy_native_node_is_waited_for_until_the_native_wait_is_over() -> None:
    x86 = view("x86", [AMD64], [ARM64])
    pi = view("pi", [ARM64], busy=1)
    request = ask(ARM64, since=100.0)
    assert decide(request, [x86, pi], ALLOW, {}, 130.0) == Wait(
        ARM64,
        "waiting for a native node: pi is busy (1/1 slots); 4m30s left of --native-wait 5m, "
        "then x86 may emulate it",
        400.0,
    )
    # At the deadline: emulated, and the reason says why.
    assert decide(request, [x86, pi], ALLOW, {}, 400.0) == Assign(
        ARM64,
        "x86",
        "emulated",
        "x86 emulates linux/arm64 with QEMU: no native node is free (pi is busy (1/1 slots)) "
        "and --native-wait 5m is over",
    )


def test_no_native_wait_emulates_at_once() -> None:
    x86 = view("x86", [AMD64], [ARM64])
    pi = view("pi", [ARM64], busy=1)
    decision = decide(ask(ARM64), [x86, pi], NO_WAIT, {}, 0.0)
    assert decision == Assign(
        ARM64,
        "x86",
        "emulated",
        "x86 emulates linux/arm64 with QEMU: no native node is free (pi is busy (1/1 slots)) "
        "and --native-wait 0s is over",
    )


def test_an_endless_native_wait_has_no_deadline() -> None:
    forever = Policy(native_wait=math.inf)
    decision = decide(
        ask(ARM64), [view("x86", [AMD64], [ARM64]), view("pi", [ARM64], busy=1)], forever, {}, 1e9
    )
    assert decision == Wait(
        ARM64,
        "waiting for a native node: pi is busy (1/1 slots); forever left of --native-wait forever, "
        "then x86 may emulate it",
        None,
    )


def test_a_down_native_node_due_back_is_waited_for_until_its_probe() -> None:
    x86 = view("x86", [AMD64], [ARM64], busy=1)
    pi = view("pi", [ARM64], state="quarantined", back_at=60.0)
    decision = decide(ask(ARM64), [x86, pi], ALLOW, {}, 0.0)
    assert decision == Wait(
        ARM64,
        "waiting for a native node: pi is quarantined (next probe in 1m); 5m left of --native-wait 5m, "
        "then x86 may emulate it",
        60.0,  # the probe, before the deadline
    )
    # Probe overdue: the deadline is the next time to look.
    decision = decide(ask(ARM64), [x86, pi], ALLOW, {}, 70.0)
    assert isinstance(decision, Wait)
    assert decision.retry_at == 300.0
    assert "pi is quarantined (probe due)" in decision.reason


def test_native_wait_then_says_what_follows() -> None:
    pi = view("pi", [S390X], busy=1)
    off = view("x86", [AMD64], [S390X], emulation=False)
    decision = decide(ask(S390X), [pi, off], DENY, {}, 0.0)
    assert isinstance(decision, Wait)
    assert decision.reason.endswith("5m left of --native-wait 5m (emulation is denied for linux/s390x)")
    decision = decide(ask(S390X), [pi, off], ALLOW, {}, 0.0)
    assert isinstance(decision, Wait)
    assert decision.reason.endswith("5m left of --native-wait 5m (no node can emulate it)")


def test_after_the_wait_a_busy_node_of_either_kind_is_waited_for() -> None:
    x86 = view("x86", [AMD64], [ARM64], slots=2, busy=2)
    pi = view("pi", [ARM64], busy=1)
    assert decide(ask(ARM64), [x86, pi], ALLOW, {}, 400.0) == Wait(
        ARM64, "waiting for a free slot: pi is busy (1/1 slots), x86 is busy (2/2 slots)", None
    )
    # Emulation denied: still wait for the busy native node, whatever the native wait says.
    assert decide(ask(ARM64), [x86, pi], DENY, {}, 400.0) == Wait(
        ARM64, "waiting for a free slot: pi is busy (1/1 slots)", None
    )


def test_a_down_native_node_is_given_up_after_the_wait() -> None:
    pi = view("pi", [ARM64], state="down", back_at=500.0)
    decision = decide(ask(ARM64), [pi], ALLOW, {}, 400.0)
    assert decision == Fail(
        ARM64,
        "linux/arm64: pi runs it natively but is down (next probe in 1m40s)",
        "a longer --native-wait waits for a down or quarantined node to come back",
    )


@pytest.mark.parametrize("state", ["draining", "cordoned"])
def test_draining_and_cordoned_nodes_are_not_waited_for(state: State) -> None:
    x86 = view("x86", [AMD64], [ARM64])
    pi = view("pi", [ARM64], state=state)
    assert decide(ask(ARM64), [x86, pi], ALLOW, {}, 0.0) == Assign(
        ARM64,
        "x86",
        "emulated",
        f"x86 emulates linux/arm64 with QEMU: no native node is free (pi is {state})",
    )
    assert decide(ask(ARM64), [x86, pi], DENY, {}, 0.0) == Fail(
        ARM64,
        f"linux/arm64: pi runs it natively but is {state}; emulation is denied for it; x86 could emulate it",
        "allow it with --emulation allow=linux/arm64; "
        + {
            "draining": "a drained node takes work again once undrained ('farm nodes undrain')",
            "cordoned": "a cordoned node takes work again once uncordoned",
        }[state],
    )


def test_emulation_denied_for_one_platform() -> None:
    x86 = view("x86", [AMD64], [S390X, PPC64LE])
    policy = parse_policy(["deny=linux/s390x"])
    assert decide(ask(S390X), [x86], policy, {}, 0.0) == Fail(
        S390X,
        "linux/s390x: no node runs it natively; emulation is denied for it; x86 could emulate it",
        "allow it with --emulation allow=linux/s390x",
    )
    assert decide(ask(PPC64LE), [x86], policy, {}, 0.0) == Assign(
        PPC64LE, "x86", "emulated", "x86 emulates linux/ppc64le with QEMU: no node runs it natively"
    )


def test_emulation_denied_except_for_one_platform() -> None:
    x86 = view("x86", [AMD64], [S390X, PPC64LE])
    policy = parse_policy(["deny", "allow=linux/ppc64le"])
    assert isinstance(decide(ask(S390X), [x86], policy, {}, 0.0), Fail)
    assert isinstance(decide(ask(PPC64LE), [x86], policy, {}, 0.0), Assign)


def test_denied_emulation_names_only_nodes_that_could_emulate() -> None:
    nodes = [view("off", [AMD64], [S390X], emulation=False), view("gone", [AMD64], [S390X])]
    assert decide(ask(S390X, excluded=["gone"]), nodes, DENY, {}, 0.0) == Fail(
        S390X,
        "linux/s390x: no node runs it natively; emulation is denied for it",
        "set 'emulation: true' for a node in the inventory to let it emulate",
    )


def test_a_node_with_emulation_off_emulates_nothing() -> None:
    off = view("x86", [AMD64], [S390X], emulation=False)
    assert decide(ask(S390X), [off], ALLOW, {}, 0.0) == Fail(
        S390X,
        "linux/s390x: no node runs it natively; x86 could emulate it but has emulation off",
        "set 'emulation: true' for a node in the inventory to let it emulate",
    )
    # It still builds what it runs natively.
    assert decide(ask(AMD64), [off], ALLOW, {}, 0.0) == Assign(
        AMD64, "x86", "native", "x86 runs linux/amd64 natively"
    )


def test_labels_restrict_the_nodes() -> None:
    policy = parse_policy(labels=["rack=b2"])
    b1 = view("b1", [ARM64], labels={"rack": "b1"})
    bare = view("bare", [ARM64])
    b2 = view("b2", [ARM64], labels={"rack": "b2", "gpu": "no"})
    assert decide(ask(ARM64), [b1, bare, b2], policy, {}, 0.0) == Assign(
        ARM64, "b2", "native", "b2 runs linux/arm64 natively"
    )
    assert decide(ask(ARM64), [b1, bare], policy, {}, 0.0) == Fail(
        ARM64,
        "linux/arm64: b1 runs it natively but lacks label rack=b2, "
        "bare runs it natively but lacks label rack=b2",
        "only nodes labelled rack=b2 are used: change or drop --label",
    )


def test_excluded_nodes_are_never_chosen() -> None:
    pi = view("pi", [ARM64])
    x86 = view("x86", [AMD64], [ARM64])
    assert decide(ask(ARM64, excluded=["pi"]), [pi, x86], ALLOW, {}, 0.0) == Assign(
        ARM64,
        "x86",
        "emulated",
        "x86 emulates linux/arm64 with QEMU: no native node is free (pi failed it already)",
    )
    assert decide(ask(ARM64, excluded=["pi", "x86"]), [pi, x86], ALLOW, {}, 0.0) == Fail(
        ARM64,
        "linux/arm64: pi runs it natively but failed it already; x86 could emulate it but failed it already",
        None,
    )


def test_no_node_can_build_it() -> None:
    nodes = [view("x86", [AMD64, I386], [ARM64, S390X]), view("pi", [ARM64]), view("pi2", [ARM64])]
    assert decide(ask(RISCV), nodes, ALLOW, {}, 0.0) == Fail(
        RISCV,
        "no node can build linux/riscv64",
        "the farm builds natively: linux/386 (x86), linux/amd64 (x86), linux/arm64 (pi and pi2); "
        "under QEMU: linux/arm64 (x86), linux/s390x (x86); "
        "add a node that runs linux/riscv64 natively, "
        "or register its QEMU handler on one (deploy/lab/setup.sh)",
    )


def test_no_node_at_all() -> None:
    assert decide(ask(RISCV), [], ALLOW, {}, 0.0) == Fail(
        RISCV,
        "no node can build linux/riscv64",
        "the farm has no usable node; add a node that runs linux/riscv64 natively, "
        "or register its QEMU handler on one (deploy/lab/setup.sh)",
    )


def test_nodes_that_build_nothing() -> None:
    decision = decide(ask(RISCV), [view("odd")], ALLOW, {}, 0.0)
    assert isinstance(decision, Fail)
    assert decision.hint is not None
    assert decision.hint.startswith("the farm builds nothing; add a node")


def test_long_lists_are_cut() -> None:
    nodes = [view(f"n{i}", [ARM64], busy=1) for i in range(8)]
    assert decide(ask(ARM64), nodes, DENY, {}, 400.0) == Wait(
        ARM64,
        "waiting for a free slot: n0 is busy (1/1 slots), n1 is busy (1/1 slots), n2 is busy (1/1 slots), "
        "n3 is busy (1/1 slots), n4 is busy (1/1 slots), and 3 more",
        None,
    )
    emulators = [view(f"x{i}", [AMD64], [S390X]) for i in range(7)]
    decision = decide(ask(S390X), emulators, DENY, {}, 0.0)
    assert isinstance(decision, Fail)
    assert decision.message.endswith("x0, x1, x2, x3, x4 and 2 more could emulate it")


def test_a_fail_is_a_plan_error() -> None:
    error = Fail(S390X, "linux/s390x: nope", "do this").error()
    assert isinstance(error, PlanError)
    assert (error.message, error.hint) == ("linux/s390x: nope", "do this")


def test_plan_counts_what_it_assigned_as_busy() -> None:
    x86 = view("x86", [AMD64, I386], [ARM64, S390X], slots=2)
    pi = view("pi", [ARM64, ARM_V7])
    requests = [ask(AMD64), ask(ARM64), ask(ARM_V7), ask(S390X), ask(I386)]
    assert plan(requests, [x86, pi], ALLOW, {}, 0.0) == [
        Assign(AMD64, "x86", "native", "x86 runs linux/amd64 natively"),
        Assign(ARM64, "pi", "native", "pi runs linux/arm64 natively"),
        Wait(
            ARM_V7,
            "waiting for a native node: pi is busy (1/1 slots); 5m left of --native-wait 5m "
            "(no node can emulate it)",
            300.0,
        ),
        Assign(S390X, "x86", "emulated", "x86 emulates linux/s390x with QEMU: no node runs it natively"),
        Wait(
            I386,
            "waiting for a native node: x86 is busy (2/2 slots); 5m left of --native-wait 5m "
            "(no node can emulate it)",
            300.0,
        ),
    ]
    # The views passed in are not changed.
    assert (x86.busy, pi.busy) == (0, 0)


def test_plan_of_nothing() -> None:
    assert plan([], [view("a", [AMD64])], ALLOW, {}, 0.0) == []


def test_node_view_checks_its_slots_and_says_when_free() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        view("a", slots=0)
    with pytest.raises(ValueError, match="at least one slot"):
        view("a", busy=-1)
    assert view("a").free
    assert not view("a", busy=1).free
    assert not view("a", state="draining").free
    assert hash(view("a", labels={"k": "v"})) == hash(view("a", labels={"k": "w"}))


def test_affinity_key() -> None:
    assert affinity_key("sha256:ctx", "sha256:df") == "sha256:ctx+sha256:df"


# --- Policy and its CLI spellings ----------------------------------------------------------------


def test_policy_defaults() -> None:
    assert parse_policy() == Policy()
    assert Policy() == Policy(
        emulation="allow", allow=frozenset(), deny=frozenset(), native_wait=DEFAULT_NATIVE_WAIT, labels={}
    )


@pytest.mark.parametrize(
    ("emulation", "default", "allow", "deny"),
    [
        (["allow"], "allow", set(), set()),
        (["deny"], "deny", set(), set()),
        (["DENY", "deny"], "deny", set(), set()),
        (["deny=linux/s390x"], "allow", set(), {S390X}),
        (["deny=s390x,ppc64le"], "allow", set(), {S390X, PPC64LE}),
        (["deny=linux/s390x", "deny=linux/ppc64le"], "allow", set(), {S390X, PPC64LE}),
        (["deny", "allow=arm64,armhf"], "deny", {ARM64, ARM_V7}, set()),
        (["deny,allow=aarch64"], "deny", {ARM64}, set()),
        (["allow=arm64,deny=s390x,ppc64le"], "allow", {ARM64}, {S390X, PPC64LE}),
        ([" deny = linux/s390x "], "allow", set(), {S390X}),
        (["deny=s390x", "deny=s390x"], "allow", set(), {S390X}),
    ],
)
def test_emulation_spellings(
    emulation: list[str], default: str, allow: set[Platform], deny: set[Platform]
) -> None:
    policy = parse_policy(emulation)
    assert policy.emulation == default
    assert set(policy.allow) == allow
    assert set(policy.deny) == deny


@pytest.mark.parametrize(
    ("emulation", "error", "message"),
    [
        (["allow", "deny"], InputError, "--emulation says both allow and deny for every platform"),
        (["maybe=s390x"], InputError, "--emulation 'maybe=s390x': 'maybe' is neither allow nor deny"),
        (["s390x"], InputError, "--emulation 's390x': 's390x' needs allow= or deny= before it"),
        (["deny,s390x"], InputError, "--emulation 'deny,s390x': 's390x' needs allow= or deny= before it"),
        ([""], InputError, "--emulation '': '' needs allow= or deny= before it"),
        (["deny=s390x", "allow=s390x"], InputError, "--emulation both allows and denies linux/s390x"),
        (["deny=sparc"], PlatformError, "--emulation 'deny=sparc': unknown architecture 'sparc'"),
        (["deny=s390x,"], PlatformError, "--emulation 'deny=s390x,': malformed platform ''"),
    ],
)
def test_bad_emulation_spellings(emulation: list[str], error: type[InputError], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_policy(emulation)
    assert type(caught.value) is error
    assert caught.value.message == message
    assert caught.value.hint


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([], {}),
        (["rack=b2"], {"rack": "b2"}),
        (["rack=b2,gpu=yes", "zone=eu"], {"rack": "b2", "gpu": "yes", "zone": "eu"}),
        ([" rack = b2 "], {"rack": "b2"}),
        (["rack=b2", "rack=b2"], {"rack": "b2"}),
        (["empty="], {"empty": ""}),
        (["k=a=b"], {"k": "a=b"}),
    ],
)
def test_label_spellings(labels: list[str], expected: dict[str, str]) -> None:
    assert parse_policy(labels=labels).labels == expected


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["rack"], "--label 'rack': expected key=value"),
        (["=b2"], "--label '=b2': expected key=value"),
        (["my rack=b2"], "--label 'my rack=b2': expected key=value"),
        (["rack=b1", "rack=b2"], "--label gives rack two values: 'b1' and 'b2'"),
    ],
)
def test_bad_label_spellings(labels: list[str], message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_policy(labels=labels)
    assert caught.value.message == message
    assert caught.value.hint


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        (" 0 ", 0.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1H", 3600.0),
        ("1.5m", 90.0),
        (".5s", 0.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_policy(native_wait=text).native_wait == seconds


@pytest.mark.parametrize("text", ["", "5", "90", "-5m", "5 m", "m", "5mm", "5d", "1.2.3s", "forever", "0x"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_policy(native_wait=text)
    assert caught.value.message == f"--native-wait {text!r} is not a duration"
    assert caught.value.hint == "write a duration such as 90s, 5m, 1h30m or 1.5m, or 0 to never wait"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "0.25s"),
        (12.345, "12.3s"),
        (45, "45s"),
        (59.7, "1m"),
        (60, "1m"),
        (90, "1m30s"),
        (300, "5m"),
        (3600, "1h"),
        (3725, "1h2m5s"),
        (math.inf, "forever"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@_SETTINGS
@given(st.integers(0, 10**6))
def test_durations_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_policy_round_trips_through_its_dump() -> None:
    policy = parse_policy(["deny", "allow=arm64,s390x"], ["rack=b2"], "90s")
    assert policy.model_dump() == {
        "emulation": "deny",
        "allow": ["linux/arm64", "linux/s390x"],
        "deny": [],
        "native_wait": 90.0,
        "labels": {"rack": "b2"},
    }
    assert Policy.model_validate(policy.model_dump()) == policy
    assert Policy.model_validate_json(policy.model_dump_json()) == policy
    # Base plus overrides, validated (the house way).
    with pytest.raises(ValidationError, match="both allowed and denied for linux/arm64"):
        Policy.model_validate(policy.model_dump() | {"deny": ["linux/arm64"]})


def test_policy_validates_on_its_own_too() -> None:
    assert Policy(deny=["linux/s390x"]).deny == {S390X}  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="both allowed and denied for linux/s390x"):
        Policy(allow=frozenset({S390X}), deny=frozenset({S390X}))
    with pytest.raises(ValidationError, match="unknown architecture 'sparc'"):
        Policy(deny=["sparc"])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Policy(deny="linux/s390x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Policy(native_wait=-1)
    with pytest.raises(ValidationError):
        Policy(emulation="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Policy(colour="blue")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("policy", "allowed"),
    [
        (Policy(), {S390X, ARM64}),
        (Policy(emulation="deny"), set()),
        (Policy(deny=frozenset({S390X})), {ARM64}),
        (Policy(emulation="deny", allow=frozenset({S390X})), {S390X}),
    ],
)
def test_allows_emulation(policy: Policy, allowed: set[Platform]) -> None:
    assert {p for p in (S390X, ARM64) if policy.allows_emulation(p)} == allowed


def test_admits() -> None:
    policy = Policy(labels={"rack": "b2", "zone": "eu"})
    assert policy.admits({"rack": "b2", "zone": "eu", "extra": "x"})
    assert not policy.admits({"rack": "b2"})
    assert policy.missing_label({"rack": "b1", "zone": "eu"}) == "rack=b2"
    assert Policy().admits({})


# --- Exhaustive small farms, against the rules as written in the module docstring ---------------

_STATES: tuple[State, ...] = ("up", "down", "draining", "cordoned", "quarantined")
# How a node relates to the platform asked for (S390X): runs it, emulates it, emulates with the
# inventory's switch off, or cannot build it.
_ROLES = ("native", "emulated", "off", "none")


def _farm_node(name: str, role: str, state: State, full: bool, excluded: bool) -> tuple[NodeView, bool]:
    native = {S390X} if role == "native" else {AMD64}
    emulated = {S390X} if role in ("emulated", "off") else set()
    node = view(
        name,
        native,
        emulated,
        slots=2,
        busy=2 if full else 1,
        state=state,
        emulation=role != "off",
        back_at=50.0,
    )
    return node, excluded


def _expected(
    nodes: list[NodeView], excluded: set[str], policy: Policy, now: float
) -> tuple[str, str | None]:
    """The rules, restated plainly: (kind, mode) of the decision for S390X."""

    def eligible(node: NodeView) -> bool:
        return node.name not in excluded and policy.admits(node.labels)

    native = [n for n in nodes if S390X in n.native and eligible(n)]
    emulating = [
        n
        for n in nodes
        if S390X not in n.native and S390X in n.emulated and n.emulation_allowed and eligible(n)
    ]
    if not policy.allows_emulation(S390X):
        emulating = []
    if any(n.free for n in native):
        return "assign", "native"
    coming = [n for n in native if n.state in ("down", "quarantined") or (n.state == "up" and not n.free)]
    if coming and now < policy.native_wait:
        return "wait", None
    if any(n.free for n in emulating):
        return "assign", "emulated"
    if any(n.state == "up" and not n.free for n in native + emulating):
        return "wait", None
    return "fail", None


_ONE_NODE = list(itertools.product(_ROLES, _STATES, (False, True), (False, True)))


@pytest.mark.parametrize("policy", [ALLOW, DENY, NO_WAIT])
@pytest.mark.parametrize("now", [0.0, 400.0])
def test_every_one_and_two_node_farm(policy: Policy, now: float) -> None:
    for size in (1, 2):
        for shapes in itertools.product(_ONE_NODE, repeat=size):
            built = [_farm_node(f"n{i}", *shape) for i, shape in enumerate(shapes)]
            nodes = [node for node, _ in built]
            excluded = {node.name for node, gone in built if gone}
            request = ask(S390X, excluded=excluded)
            decision = decide(request, nodes, policy, {}, now)
            kind, mode = _expected(nodes, excluded, policy, now)
            assert type(decision).__name__.lower() == kind, (shapes, decision)
            if isinstance(decision, Assign):
                assert decision.mode == mode
                chosen = next(n for n in nodes if n.name == decision.node)
                assert chosen.free
                assert chosen.name not in excluded
                # Ties broken by load then inventory order.
                pool = [
                    n
                    for n in nodes
                    if n.free
                    and n.name not in excluded
                    and (
                        S390X in n.native if mode == "native" else n.emulation_allowed and S390X in n.emulated
                    )
                ]
                assert chosen == min(pool, key=lambda n: (n.busy / n.slots, nodes.index(n)))
            if isinstance(decision, Wait):
                assert decision.retry_at is None or decision.retry_at > now
            if isinstance(decision, Fail):
                assert decision.message.startswith(("linux/s390x: ", "no node can build linux/s390x"))


# --- Properties ----------------------------------------------------------------------------------

_FEW = st.sampled_from([AMD64, ARM64, S390X])


@st.composite
def farms(draw: st.DrawFn) -> list[NodeView]:
    count = draw(st.integers(0, 5))
    nodes = []
    for index in range(count):
        slots = draw(st.integers(1, 3))
        nodes.append(
            view(
                f"n{index}",
                draw(st.sets(_FEW, max_size=2)),
                draw(st.sets(_FEW, max_size=3)),
                slots=slots,
                busy=draw(st.integers(0, slots)),
                state=draw(st.sampled_from(_STATES)),
                labels=draw(st.sampled_from([{}, {"rack": "a"}, {"rack": "b"}])),
                speed=draw(st.sampled_from([1.0, 2.0])),
                emulation=draw(st.booleans()),
                back_at=draw(st.sampled_from([None, 10.0, 500.0])),
            )
        )
    return nodes


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    allow = draw(st.sets(_FEW, max_size=2))
    deny = draw(st.sets(_FEW, max_size=2)) - allow
    return Policy(
        emulation=draw(st.sampled_from(["allow", "deny"])),
        allow=frozenset(allow),
        deny=frozenset(deny),
        native_wait=draw(st.sampled_from([0.0, 60.0, math.inf])),
        labels=draw(st.sampled_from([{}, {"rack": "a"}])),
    )


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[Request, list[NodeView], Policy, dict[tuple[str, Platform], str], float]:
    nodes = draw(farms())
    names = [n.name for n in nodes]
    platform = draw(_FEW)
    request = ask(
        platform,
        affinity=draw(st.sampled_from([None, "ctx"])),
        excluded=draw(st.sets(st.sampled_from(names))) if names else (),
        since=draw(st.sampled_from([0.0, 30.0])),
    )
    remembered = draw(st.booleans())
    history = {("ctx", platform): draw(st.sampled_from(names))} if names and remembered else {}
    return request, nodes, draw(policies()), history, draw(st.sampled_from([0.0, 45.0, 100.0]))


Situation = tuple[Request, list[NodeView], Policy, dict[tuple[str, Platform], str], float]


def _usable(node: NodeView, request: Request, policy: Policy) -> bool:
    return node.free and node.name not in request.excluded and policy.admits(node.labels)


@_SETTINGS
@given(situations())
def test_decisions_are_sound(situation: Situation) -> None:
    request, nodes, policy, history, now = situation
    decision = decide(request, nodes, policy, history, now)
    # Deterministic.
    assert decide(request, list(nodes), policy, dict(history), now) == decision
    assert decision.platform == request.platform
    p = request.platform
    native_free = [n for n in nodes if p in n.native and _usable(n, request, policy)]
    if native_free:
        # A free native node is never passed over, and the warm cache wins among them.
        assert isinstance(decision, Assign)
        assert decision.mode == "native"
        affine = history.get(("ctx", p)) if request.affinity else None
        if affine in {n.name for n in native_free}:
            assert decision.node == affine
    if isinstance(decision, Assign):
        chosen = next(n for n in nodes if n.name == decision.node)
        assert _usable(chosen, request, policy)  # never excluded, unlabelled, not up, or full
        if decision.mode == "native":
            assert p in chosen.native
        else:
            assert p in chosen.emulated
            assert p not in chosen.native
            assert chosen.emulation_allowed
            assert policy.allows_emulation(p)
            assert not native_free
    if isinstance(decision, Wait):
        assert decision.retry_at is None or decision.retry_at > now
    if isinstance(decision, Fail):
        # Nothing usable is free or merely busy.
        for node in nodes:
            capable = p in node.native or (
                p in node.emulated and node.emulation_allowed and policy.allows_emulation(p)
            )
            if capable and node.name not in request.excluded and policy.admits(node.labels):
                assert node.state != "up"


@_SETTINGS
@given(situations())
def test_deny_never_emulates(situation: Situation) -> None:
    request, nodes, policy, history, now = situation
    denied = Policy.model_validate(policy.model_dump() | {"emulation": "deny", "allow": frozenset()})
    decision = decide(request, nodes, denied, history, now)
    assert not (isinstance(decision, Assign) and decision.mode == "emulated")


@_SETTINGS
@given(farms(), policies(), st.lists(_FEW, max_size=12))
def test_a_plan_never_overfills_a_node(
    nodes: list[NodeView], policy: Policy, platforms: list[Platform]
) -> None:
    decisions = plan([ask(p) for p in platforms], nodes, policy, {}, 0.0)
    assert [d.platform for d in decisions] == platforms
    assigned = Counter(d.node for d in decisions if isinstance(d, Assign))
    for node in nodes:
        assert node.busy + assigned[node.name] <= node.slots
