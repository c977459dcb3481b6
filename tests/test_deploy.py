"""deploy/: the systemd unit, the node set-up script, Prometheus's config and rules, the dashboard.

Each file is checked by the tool that consumes it, never by reading it back alone:

* the unit by ``systemd-analyze verify`` in a throwaway root holding a copy of the system's units
  and a stand-in at its ``ExecStart`` path (verify insists the binary exists), and by
  ``systemd-analyze security`` for its exposure score; the user it runs as by ``systemd-sysusers``
  in a throwaway root;
* ``deploy/node/setup-node.sh`` by ``bash -n`` and ``shellcheck``, by its ``--dry-run`` plan on
  this machine (which must change nothing), and for real as root inside a throwaway copy
  (overlayfs) of the lab's arm64 Debian box: run twice (the second run only skips), then the
  box's own sshd is started and ``farm nodes check`` logs in with the key it authorized;
* the Prometheus files by ``promtool check config``, ``check rules`` and ``test rules``, by
  mutations of the rules that the unit tests must catch, and by a real Prometheus scraping a
  stand-in exporter through the scrape config (bearer token from the file) with the rules loaded;
* the dashboard as JSON (layout, variables, required panels), every PromQL expression by
  ``promtool check rules`` (as recording rules), against the metric names and labels ``farm
  serve`` exports, and through that real Prometheus (each must return data).

The stand-in exporter serves exactly the metric names and labels ``farm serve`` is specified to
export (``FARM_METRICS``); it stands for the server until its own tests scrape it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tests import lab, sshlab

pytestmark = pytest.mark.lab

DEPLOY = lab.REPO / "deploy"
UNIT = DEPLOY / "systemd" / "farm-serve.service"
SYSUSERS = DEPLOY / "systemd" / "farm.sysusers.conf"
SETUP_NODE = DEPLOY / "node" / "setup-node.sh"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "farm-dashboard.json"

# What `farm serve` exports (issue 6): name -> (type, labels). Histograms also expose
# NAME_bucket{le}, NAME_sum and NAME_count.
FARM_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "farm_build_info": ("gauge", frozenset({"version"})),
    "farm_builds_started_total": ("counter", frozenset({"platform", "mode"})),
    "farm_builds_finished_total": ("counter", frozenset({"platform", "mode", "result"})),
    "farm_build_duration_seconds": ("histogram", frozenset({"platform", "mode"})),
    "farm_queue_wait_seconds": ("histogram", frozenset()),
    "farm_emulation_fallbacks_total": ("counter", frozenset({"platform", "reason"})),
    "farm_nodes": ("gauge", frozenset({"state", "platform"})),
    "farm_node_slots": ("gauge", frozenset({"node"})),
    "farm_node_busy_slots": ("gauge", frozenset({"node"})),
    "farm_node_heartbeat_age_seconds": ("gauge", frozenset({"node"})),
    "farm_ssh_connect_seconds": ("histogram", frozenset({"node"})),
    "farm_ssh_connect_errors_total": ("counter", frozenset({"node"})),
    "farm_context_bytes_sent_total": ("counter", frozenset()),
    "farm_context_bytes_skipped_total": ("counter", frozenset()),
    "farm_index_pushes_total": ("counter", frozenset({"result"})),
    "farm_queue_length": ("gauge", frozenset()),
    "farm_builds_running": ("gauge", frozenset()),
}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every scraped series
NODE_STATES = ("up", "down", "draining", "cordoned", "quarantined")
RESULTS = ("success", "failure", "cancelled")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's {package} package (deploy/lab/setup.sh should)")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


# --- PromQL: which metric names and labels an expression uses -------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "group_left", "group_right"}


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus sees it once Grafana has filled in its variables."""
    for variable, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "6h")):
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?(instance|platform)\}?", ".*", expr)


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) in a PromQL expression: selectors, matchers and groupings."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for match in _SELECTOR.finditer(text):
        labels |= {
            m.group(0) for m in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*(?=\s*(=~|!~|!=|=))", match.group(2))
        }
    text = re.sub(r"\{[^}]*\}", " ", text)
    for match in _GROUPING.finditer(text):
        labels |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in _WORD.finditer(text):
        before = text[: match.start()].rstrip()[-1:]
        after = text[match.end() :].lstrip()[:1]
        if after == "(" or match.group(0).lower() in _KEYWORDS or before.isdigit() or before == ".":
            continue  # a function or aggregation, a keyword, a number's exponent or unit
        names.add(match.group(0))
    return names, labels


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """Each ``name{matchers}`` in an expression with the label names its matchers use."""
    text = _STRING.sub('""', expr)
    found = []
    for match in _SELECTOR.finditer(text):
        if match.group(1):
            used = {
                m.group(0) for m in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*(?=\s*(=~|!~|!=|=))", match.group(2))
            }
            found.append((match.group(1), used))
    return found


def base_metric(name: str) -> str | None:
    """The farm metric a series name belongs to (histograms' _bucket, _sum, _count), or None."""
    if name in FARM_METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and FARM_METRICS.get(base, ("", frozenset()))[0] == "histogram":
            return base
    return None


def labels_of(name: str) -> frozenset[str]:
    base = base_metric(name)
    assert base is not None
    extra = {"le"} if name.endswith("_bucket") else set()
    return FARM_METRICS[base][1] | TARGET_LABELS | extra


def check_expression(expr: str, allowed_extra: frozenset[str] = frozenset()) -> list[str]:
    """What is wrong with an expression's metric names and labels (empty: nothing)."""
    problems = []
    names, labels = promql_names(expr)
    known = {name for name in names if base_metric(name) is not None}
    for name in sorted(names - known - allowed_extra):
        problems.append(f"unknown metric {name}")
    for name, used in selector_labels(expr):
        if name in known:
            problems += [f"{name} has no label {label}" for label in sorted(used - labels_of(name))]
    if problems:
        return problems  # labels are only judged against known metrics
    available = set().union(*(labels_of(name) for name in known)) if known else set(TARGET_LABELS)
    return [f"no metric here has label {label}" for label in sorted(labels - available)]


def test_promql_checker_catches_wrong_names_and_labels() -> None:
    """The checker the dashboard and rules tests rely on finds what it must (and no more)."""
    good = (
        "histogram_quantile(0.95, sum by (le, platform)"
        ' (rate(farm_build_duration_seconds_bucket{mode="native"}[5m])))'
        ' / on (instance) group_left sum(farm_queue_length offset 1h) * 1e3 + count(up{job="farm"})'
    )
    assert check_expression(good, frozenset({"up"})) == []
    assert check_expression('sum(rate(farm_builds_total{result="x"}[5m]))') == [
        "unknown metric farm_builds_total"
    ]
    assert check_expression('farm_nodes{node="pi4"}') == ["farm_nodes has no label node"]
    assert check_expression("sum by (platfrom) (farm_builds_running)") == [
        "no metric here has label platfrom"
    ]
    assert check_expression("farm_queue_wait_seconds_total") == [
        "unknown metric farm_queue_wait_seconds_total"
    ]
    assert check_expression("farm_queue_length_bucket") == ["unknown metric farm_queue_length_bucket"]


# --- systemd ----------------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values (a key may repeat) of a unit file, all sections together."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze --root``: the system's units, the unit, a stand-in farm binary."""
    tool("systemd-analyze", "systemd")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    binary = root / unit_settings(UNIT)["ExecStart"][0].split()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return run(["systemd-analyze", "verify", f"--root={root}", unit])


def test_unit_settings() -> None:
    """The unit runs the coordinator as asked, as its own user, with each hardening option."""
    settings = unit_settings(UNIT)
    assert settings["ExecStart"] == [
        "/opt/farm/bin/farm serve --listen 127.0.0.1:8750 --inventory /etc/farm/inventory.yaml"
        " --state-dir /var/lib/farm"
    ]
    expected = {
        "User": "farm",
        "Group": "farm",
        "StateDirectory": "farm",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "@system-service" in settings["SystemCallFilter"]
    assert "DynamicUser" not in settings
    # Every setting is explained: a comment line precedes each group of settings.
    lines = UNIT.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and number and lines[number - 1].strip() == "":
            pytest.fail(f"{UNIT.name}:{number + 1}: {line!r} has no comment above it")


def test_unit_verifies(unit_root: Path) -> None:
    """systemd-analyze verify: every key known and well-formed, the binary there; not a word printed."""
    done = verify(unit_root, UNIT.name)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_unit_verify_would_catch_mistakes(unit_root: Path) -> None:
    """The verify check above is not vacuous: a misspelt key and a bad value are both reported."""
    broken = unit_root / "etc/systemd/system" / UNIT.name
    broken.write_text(
        UNIT.read_text()
        .replace("ProtectSystem=strict", "ProtectSystem=strictest")
        .replace("LockPersonality=yes", "LockPersonalty=yes")
    )
    done = verify(unit_root, UNIT.name)
    assert "Failed to parse protect system value, ignoring: strictest" in done.stderr
    assert "Unknown key 'LockPersonalty'" in done.stderr


def test_unit_exposure_is_low(unit_root: Path) -> None:
    """systemd-analyze security rates the unit's exposure at most 2.0 of 10 ("OK")."""
    done = run(
        ["systemd-analyze", "security", "--offline=true", f"--root={unit_root}", "--threshold=20", UNIT.name]
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert score, done.stdout
    assert float(score.group(1)) <= 2.0


def test_sysusers_creates_the_farm_user(tmp_path: Path) -> None:
    """farm.sysusers.conf, applied by systemd-sysusers to a throwaway root, makes farm's user and group."""
    tool("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()
    done = run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)])
    assert done.returncode == 0, done.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert passwd["farm"][5:] == ["/var/lib/farm", "/usr/sbin/nologin"]
    assert int(passwd["farm"][2]) < 1000  # a system user
    assert (tmp_path / "etc/group").read_text().startswith("farm:")
    # The unit's state directory is the user's home: keys and known_hosts live there.
    assert unit_settings(UNIT)["StateDirectory"] == ["farm"]


# --- the node set-up script -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coordinator's SSH key pair (private key path; the public key beside it as .pub)."""
    key = tmp_path_factory.mktemp("coordinator") / "id_ed25519"
    lab.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "farm@coordinator", "-f", str(key)])
    return key


def fingerprint(public_key: Path) -> str:
    return lab.run(["ssh-keygen", "-l", "-f", str(public_key)]).split()[1]


def test_setup_node_is_clean_shell() -> None:
    assert run(["bash", "-n", str(SETUP_NODE)]).returncode == 0
    done = run([tool("shellcheck", "shellcheck"), str(SETUP_NODE)])
    assert done.returncode == 0, done.stdout


def test_setup_node_dry_run_plans_and_changes_nothing(tmp_path: Path, coordinator_key: Path) -> None:
    """--dry-run on this machine: the plan names each change and its command; nothing is changed."""
    user = f"farmdry{os.getpid() % 100000}"
    workdir = tmp_path / "srv" / "farm-work"
    assert run(["getent", "passwd", user]).returncode == 2
    watched = [
        Path(name) for name in ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/subuid", "/etc/subgid")
    ]
    before = {path: path.read_bytes() for path in watched if path.exists()}
    done = run(
        [
            str(SETUP_NODE), "--dry-run", "--user", user, "--builder", "buildah", "--workdir", str(workdir),
            "--authorized-key", f"{coordinator_key}.pub",
        ]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("dry run: nothing is changed on this machine\n")
    assert re.search(r"^python3: +skip: python3 3\.\d+$", out, re.M)
    assert f"user:      would create user {user} (home /home/{user}, shell /bin/bash, no password)" in out
    assert f"useradd --create-home --home-dir /home/{user} --shell /bin/bash" in out
    assert re.search(rf"^subids: +would give {user} subordinate uids and gids \d+-\d+$", out, re.M)
    assert f"would create /home/{user}/.ssh (mode 0700)" in out
    assert f"would create /home/{user}/.ssh/authorized_keys (mode 0600)" in out
    assert f"would authorize ssh-ed25519 {fingerprint(Path(f'{coordinator_key}.pub'))}" in out
    assert f"would create {workdir} (mode 0700, owned by {user})" in out
    assert f"    user: {user}\n    builder: buildah\n    workdir: {workdir}\n    emulation: false\n" in out
    # Nothing happened.
    assert run(["getent", "passwd", user]).returncode == 2
    assert not workdir.exists()
    assert not Path(f"/home/{user}").exists()
    assert before == {path: path.read_bytes() for path in watched if path.exists()}


def test_setup_node_dry_run_with_emulation(coordinator_key: Path) -> None:
    """--emulation adds QEMU: installed packages or handlers already enabled are skipped, else planned."""
    done = run([str(SETUP_NODE), "--dry-run", "--emulation", "--authorized-key", f"{coordinator_key}.pub"])
    assert done.returncode == 0, done.stderr
    installed = lab.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "qemu-user-static"], check=False)
    if installed == "installed":
        assert "qemu-user-static" not in done.stdout.split("packages:")[1].splitlines()[0]
    else:
        assert re.search(r"^packages: +would install .*qemu-user-static binfmt-support", done.stdout, re.M)
    assert re.search(r"^binfmt: +(skip: QEMU handlers enabled: .*aarch64|would )", done.stdout, re.M)
    assert "    emulation: true\n" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--authorized-key is required"),
        (["--authorized-key", "/nonexistent/key.pub"], "neither a public key line nor a readable file"),
        (["--authorized-key", "ssh-ed25519 AAAAnotbase64!"], "base64 part is malformed"),
        (["--authorized-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG== x"], "ssh-keygen does not accept"),
        (["--authorized-key", "hello world"], "not an SSH public key line"),
        (
            ["--authorized-key", "KEY", "--builder", "kaniko"],
            "--builder must be auto, buildah, podman or docker",
        ),
        (["--authorized-key", "KEY", "--user", "Farm!"], "is not a valid user name"),
        (["--authorized-key", "KEY", "--frobnicate"], "unknown argument '--frobnicate'"),
    ],
)
def test_setup_node_refuses_bad_input(args: list[str], message: str, coordinator_key: Path) -> None:
    key = Path(f"{coordinator_key}.pub").read_text().strip()
    done = run([str(SETUP_NODE), "--dry-run", *[key if arg == "KEY" else arg for arg in args]])
    assert done.returncode == 1
    assert message in done.stderr


def test_setup_node_refuses_key_options(coordinator_key: Path) -> None:
    key = Path(f"{coordinator_key}.pub").read_text().strip()
    done = run([str(SETUP_NODE), "--dry-run", "--authorized-key", f'from="10.0.0.1" {key}'])
    assert done.returncode == 1
    assert "give the key without options" in done.stderr


class Box:
    """A throwaway root: the lab's arm64 Debian box under an overlay whose upper layer is ours.

    Every command runs in its own private mount namespace (the overlay, /proc, /dev, /run mounted
    there), chrooted into the box, under QEMU; changes land in ``upper`` and survive between
    commands, the cached box itself is never written to.
    """

    SCRIPT = """
box=$1 upper=$2 work=$3 root=$4
shift 4
mount -t overlay overlay -o "lowerdir=$box,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mkdir -p "$root/run/sshd"
exec chroot "$root" "$@"
"""

    def __init__(self, base: Path, box: Path) -> None:
        self.box = box
        self.upper, self.work, self.root = base / "upper", base / "work", base / "root"
        for folder in (self.upper, self.work, self.root):
            folder.mkdir(parents=True)

    def argv(self, *command: str) -> list[str]:
        paths = [str(self.box), str(self.upper), str(self.work), str(self.root)]
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-euc",
            self.SCRIPT,
            "sh",
            *paths,
            *command,
        ]

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*command))

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file into the box (its upper layer) before a command sees it."""
        target = self.upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    try:
        built = sshlab.ensure_arm64_box()
    except lab.LabError as error:
        pytest.fail(f"the arm64 box is needed: {error}")
    return Box(tmp_path / "box", built)


def steps(out: str) -> list[str]:
    """The step lines a run printed (not the inventory hint after them)."""
    return [line for line in out.split("\n\n")[0].splitlines() if re.match(r"^[a-z0-9]+: ", line)]


@pytest.mark.timeout(900)  # builds the arm64 box on first use (minutes under QEMU)
def test_setup_node_for_real_in_a_throwaway_root(box: Box, coordinator_key: Path, tmp_path: Path) -> None:
    """In a real Debian (arm64, under QEMU): plan, set up, set up again (all skips), then farm logs in."""
    public = Path(f"{coordinator_key}.pub")
    box.put("/tmp/farm-test/setup-node.sh", SETUP_NODE.read_bytes(), 0o755)
    box.put("/tmp/farm-test/coordinator.pub", public.read_bytes())
    # A system user made by someone else earlier: system users get no subordinate ids by default.
    assert box.run("useradd", "--system", "--shell", "/bin/bash", "--create-home", "builder").returncode == 0
    setup = ["/tmp/farm-test/setup-node.sh", "--authorized-key", "/tmp/farm-test/coordinator.pub"]

    plan = box.run(*setup, "--dry-run", "--workdir", "/srv/farm-work")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "would create user farm" in plan.stdout
    assert box.run("getent", "passwd", "farm").returncode == 2  # the plan changed nothing

    first = box.run(*setup, "--workdir", "/srv/farm-work")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "system:    Debian GNU/Linux 12 (bookworm), aarch64" in first.stdout
    assert "builder:   auto: buildah" in first.stdout  # the box has buildah and no docker
    assert "packages:  skip: everything needed is installed" in first.stdout
    assert "user:      create user farm (home /home/farm, shell /bin/bash, no password): done" in first.stdout
    assert (
        f"key:       authorize ssh-ed25519 {fingerprint(public)} (farm@coordinator) (restrict): done"
        in first.stdout
    )
    assert "workdir:   create /srv/farm-work (mode 0700, owned by farm): done" in first.stdout

    again = box.run(*setup, "--workdir", "/srv/farm-work")
    assert again.returncode == 0, again.stdout + again.stderr
    changed = [line for line in steps(again.stdout) if "skip" not in line and not line.startswith("system:")]
    assert changed == ["builder:   auto: buildah"], again.stdout

    second_key = tmp_path / "second"
    lab.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "second", "-f", str(second_key)])
    box.put("/tmp/farm-test/second.pub", Path(f"{second_key}.pub").read_bytes())
    other = box.run(
        "/tmp/farm-test/setup-node.sh", "--user", "builder", "--authorized-key", "/tmp/farm-test/second.pub"
    )
    assert other.returncode == 0, other.stdout + other.stderr
    assert "user:      skip: builder exists" in other.stdout
    assert re.search(
        r"^subids: +give builder subordinate uids and gids 165536-231071: done$", other.stdout, re.M
    )

    state = box.run(
        "sh", "-c",
        "getent passwd farm; grep -h '^farm:' /etc/shadow /etc/subuid /etc/subgid;"
        " grep -h '^builder:' /etc/subuid;"
        " stat -c '%U %a %n' /home/farm/.ssh /home/farm/.ssh/authorized_keys /srv/farm-work;"
        " cat /home/farm/.ssh/authorized_keys",
    )  # fmt: skip
    assert state.returncode == 0, state.stderr
    lines = state.stdout.splitlines()
    assert lines[0].endswith(":farm build node:/home/farm:/bin/bash")
    assert lines[1].startswith("farm:*:")  # no password, and not a locked "!" account
    assert lines[2] == lines[3] == "farm:100000:65536"
    assert lines[4] == "builder:165536:65536"
    assert lines[5:8] == [
        "farm 700 /home/farm/.ssh",
        "farm 600 /home/farm/.ssh/authorized_keys",
        "farm 700 /srv/farm-work",
    ]
    assert lines[8:] == [f"restrict {public.read_text().strip()}"]

    # The box's own sshd on a loopback port; farm logs in as farm with the coordinator's key.
    host_key = tmp_path / "host_key"
    lab.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
    box.put("/etc/ssh/farm_test_host_key", host_key.read_bytes(), 0o600)
    port = lab.free_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"[127.0.0.1]:{port} {' '.join(Path(f'{host_key}.pub').read_text().split()[:2])}\n"
    )
    sshd_argv = ["/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-o", "ListenAddress=127.0.0.1"]
    sshd = subprocess.Popen(
        box.argv(*sshd_argv, "-h", "/etc/ssh/farm_test_host_key"),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sshd.log").open("w"),
        start_new_session=True,
    )
    try:
        lab.wait_until(lambda: banner(port), "the box's sshd answering", seconds=60)
        ssh = [
            "ssh", "-p", str(port), "-i", str(coordinator_key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
        ]  # fmt: skip
        who = run(
            [
                *ssh,
                "farm@127.0.0.1",
                "id -un; uname -m; python3 -c 'import sys; print(sys.version_info >= (3, 9))'",
            ]
        )
        assert who.stdout.split() == ["farm", "aarch64", "True"], who.stderr
        # The second key was authorized for builder only.
        refused = run([*ssh[:4], str(second_key), *ssh[5:], "farm@127.0.0.1", "true"])
        assert refused.returncode == 255
        assert "Permission denied" in refused.stderr

        inventory = tmp_path / "inventory.yaml"
        node = {
            "name": "box", "host": "127.0.0.1", "port": port, "user": "farm", "workdir": "/srv/farm-work",
            "identity_file": str(coordinator_key), "known_hosts": str(known_hosts),
        }  # fmt: skip
        inventory.write_text(yaml.safe_dump({"nodes": [node]}))
        checked = lab.farm("nodes", "check", "--json", "--inventory", str(inventory))
        assert checked.code == 0, checked.stdout + checked.stderr
        [report] = json.loads(checked.stdout)
        assert (report["usable"], report["native"], report["builder"]) == (True, ["linux/arm64"], "buildah")
        assert report["facts"]["workdir"] == "/srv/farm-work"
    finally:
        os.killpg(sshd.pid, signal.SIGTERM)
        sshd.wait(30)


def banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            probe.settimeout(5)
            return probe.recv(4).startswith(b"SSH-")
    except OSError:
        return False


# --- Prometheus: config, rules, rule unit tests ---------------------------------------------------


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    """deploy/prometheus copied beside a token file (promtool checks that the file exists)."""
    tool("promtool", "prometheus")
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    (copy / "farm.token").write_text("0123456789abcdef\n")
    (copy / "farm.token").chmod(0o640)
    return copy


def test_promtool_check_config(prometheus_dir: Path) -> None:
    """The config parses, its rule file (farm-rules.yml, beside it) checks, the token file is found."""
    done = run(["promtool", "check", "config", str(prometheus_dir / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "farm"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "farm.token"}
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8750"]}]


def test_promtool_check_config_needs_the_token(prometheus_dir: Path) -> None:
    (prometheus_dir / "farm.token").unlink()
    done = run(["promtool", "check", "config", str(prometheus_dir / "prometheus.yml")])
    assert done.returncode != 0
    assert "farm.token" in done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    done = run([tool("promtool", "prometheus"), "check", "rules", str(PROMETHEUS_DIR / "farm-rules.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def rules() -> list[dict[str, Any]]:
    [group] = yaml.safe_load((PROMETHEUS_DIR / "farm-rules.yml").read_text())["groups"]
    return list(group["rules"])


def test_rules_use_farm_metrics_and_are_annotated() -> None:
    for rule in rules():
        problems = check_expression(str(rule["expr"]), frozenset({"up"}))
        assert problems == [], f"{rule['alert']}: {problems}"
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, rule["alert"]
        assert rule["labels"] in ({"severity": "warning"}, {"severity": "critical"}), rule["alert"]
    names = {rule["alert"] for rule in rules()}
    assert names == {
        "FarmServeDown", "FarmNodeDown", "FarmEmulationWhileNativeUp", "FarmQueueStuck",
        "FarmBuildFailureRate", "FarmNodeHeartbeatStale",
    }  # fmt: skip


def test_promtool_test_rules() -> None:
    """Every alert fires (labels and rendered annotations as expected) and stays quiet when it should."""
    done = run([tool("promtool", "prometheus"), "test", "rules", str(PROMETHEUS_DIR / "farm-rules.test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((PROMETHEUS_DIR / "farm-rules.test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert fired == names
    assert quiet == names


# Each mutation breaks one thing an alert depends on; the unit tests must notice every one.
RULE_MUTATIONS = [
    ('up{job="farm"} == 0 or absent(up{job="farm"})', 'up{job="farm"} == 0'),
    (
        "for: 5m\n        labels:\n          severity: critical",
        "for: 1m\n        labels:\n          severity: critical",
    ),
    ('state=~"down|quarantined"', 'state!="up"'),
    ("[30m])) > 2)", "[30m])) > 0)"),
    ('(farm_nodes{state="up"}) > 0)', "(farm_nodes) > 0)"),
    ("min_over_time(farm_queue_length[15m]) > 0", "farm_queue_length > 0"),
    ('result="failure"}[30m]))', 'result=~"failure|cancelled"}[30m]))'),
    ('result=~"success|failure"}[30m]))\n          ) > 0.2', 'result=~".+"}[30m]))\n          ) > 0.2'),
    ("[30m])) >= 5", "[30m])) >= 1"),
    ("(farm_node_busy_slots > 0)", "(farm_node_busy_slots >= 0)"),
    ("(farm_node_heartbeat_age_seconds > 900)", "(farm_node_heartbeat_age_seconds > 6000)"),
    ("(farm_node_heartbeat_age_seconds > 900)", "(farm_node_heartbeat_age_seconds > 60)"),
]


@pytest.mark.parametrize(("before", "after"), RULE_MUTATIONS)
def test_rule_tests_catch_mutations(prometheus_dir: Path, before: str, after: str) -> None:
    rules_file = prometheus_dir / "farm-rules.yml"
    text = rules_file.read_text()
    assert text.count(before) == 1, before
    rules_file.write_text(text.replace(before, after))
    assert run(["promtool", "check", "rules", str(rules_file)]).returncode == 0  # still valid...
    done = run(["promtool", "test", "rules", str(prometheus_dir / "farm-rules.test.yml")])
    assert done.returncode != 0, f"the rule tests did not notice {before!r} -> {after!r}"  # ...but wrong


# --- the Grafana dashboard ----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL expression) of every query in the dashboard."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in panels()
        for target in panel["targets"]
    ]


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert 36 <= int(board["schemaVersion"]) <= 41
    assert board["uid"] == "farm-overview"
    assert board["title"] == "farm"
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    every = dashboard()["panels"]
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids))
    # Each panel queries the selected data source; no two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
            assert panel.get("description"), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    """Builds, success rate, durations, queue, fallbacks, nodes, slots, heartbeats, context, SSH."""
    used = {
        base_metric(name) for _, expr in expressions() for name in promql_names(grafana_to_promql(expr))[0]
    }
    assert used == set(FARM_METRICS)  # every metric farm exports is on the dashboard
    titles = " | ".join(str(panel["title"]) for panel in panels())
    for wanted in (
        "Builds started per minute, by platform and mode", "Success rate",
        "Build duration p50 / p95, by platform and mode", "Queue length", "Queue wait p50 / p95",
        "Emulation fallbacks", "Nodes by state and platform",
        "Busy and total slots per node", "Heartbeat age per node", "Context bytes sent vs skipped",
        "SSH connect time p50 / p95",
    ):  # fmt: skip
        assert wanted in titles


@pytest.mark.parametrize(("where", "expr"), expressions())
def test_dashboard_expression_uses_farm_metrics(where: str, expr: str) -> None:
    assert check_expression(grafana_to_promql(expr)) == [], where


def test_dashboard_variables_use_farm_metrics() -> None:
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["query"]["query"])
            assert query, var["name"]
            assert check_expression(grafana_to_promql(query.group(1))) == [], var["name"]
            assert query.group(2) in labels_of(promql_names(query.group(1))[0].pop())


def test_dashboard_expressions_pass_promtool(tmp_path: Path) -> None:
    """promtool has no PromQL-only check: every expression goes in as a recording rule."""
    records = [
        {"record": f"farm_dashboard:panel_{number}", "expr": grafana_to_promql(expr)}
        for number, (_, expr) in enumerate(expressions())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = run([tool("promtool", "prometheus"), "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(records)} rules found" in done.stdout


# --- a real Prometheus scraping through deploy/prometheus/prometheus.yml -------------------------


class StandInExporter:
    """Serves farm's metric names and labels (FARM_METRICS), moving, behind a bearer token."""

    def __init__(self, token: str) -> None:
        self.registry = CollectorRegistry()
        self.token = token
        self.authorized = 0
        self.refused = 0
        reg = self.registry
        self.info = Gauge("farm_build_info", "", ["version"], registry=reg)
        self.started = Counter("farm_builds_started", "", ["platform", "mode"], registry=reg)
        self.finished = Counter("farm_builds_finished", "", ["platform", "mode", "result"], registry=reg)
        self.duration = Histogram("farm_build_duration_seconds", "", ["platform", "mode"], registry=reg)
        self.wait = Histogram("farm_queue_wait_seconds", "", registry=reg)
        self.fallbacks = Counter("farm_emulation_fallbacks", "", ["platform", "reason"], registry=reg)
        self.nodes = Gauge("farm_nodes", "", ["state", "platform"], registry=reg)
        self.slots = Gauge("farm_node_slots", "", ["node"], registry=reg)
        self.busy = Gauge("farm_node_busy_slots", "", ["node"], registry=reg)
        self.age = Gauge("farm_node_heartbeat_age_seconds", "", ["node"], registry=reg)
        self.connect = Histogram("farm_ssh_connect_seconds", "", ["node"], registry=reg)
        self.connect_errors = Counter("farm_ssh_connect_errors", "", ["node"], registry=reg)
        self.sent = Counter("farm_context_bytes_sent", "", registry=reg)
        self.skipped = Counter("farm_context_bytes_skipped", "", registry=reg)
        self.pushes = Counter("farm_index_pushes", "", ["result"], registry=reg)
        self.queue = Gauge("farm_queue_length", "", registry=reg)
        self.running = Gauge("farm_builds_running", "", registry=reg)
        self.info.labels(version="0.1.0").set(1)
        for state in NODE_STATES:
            for platform in ("linux/amd64", "linux/arm64"):
                self.nodes.labels(state=state, platform=platform).set(1 if state == "up" else 0)
        for node, slots in (("x86", 4), ("pi4", 1)):
            self.slots.labels(node=node).set(slots)
        self.random = random.Random(6)
        self.stop = threading.Event()

    def tick(self) -> None:
        """What a busy farm does in a moment: every series moves."""
        pick = self.random.choice
        for _ in range(3):
            platform, mode = pick(("linux/amd64", "linux/arm64")), pick(("native", "emulated"))
            self.started.labels(platform=platform, mode=mode).inc()
            for result in RESULTS:
                self.finished.labels(platform=platform, mode=mode, result=result).inc(
                    self.random.randint(0, 2)
                )
            self.duration.labels(platform=platform, mode=mode).observe(self.random.uniform(1, 600))
            reason = pick(("no_native_node", "native_busy", "native_unavailable"))
            self.fallbacks.labels(platform=platform, reason=reason).inc()
        self.wait.observe(self.random.uniform(0, 120))
        for node in ("x86", "pi4"):
            self.busy.labels(node=node).set(self.random.randint(0, 1))
            self.age.labels(node=node).set(self.random.uniform(0, 10))
            self.connect.labels(node=node).observe(self.random.uniform(0.05, 2))
            self.connect_errors.labels(node=node).inc(self.random.randint(0, 1))
        self.sent.inc(self.random.randint(0, 1 << 20))
        self.skipped.inc(self.random.randint(0, 1 << 22))
        self.pushes.labels(result=pick(("success", "failure"))).inc()
        self.queue.set(self.random.randint(0, 5))
        self.running.set(self.random.randint(0, 5))

    def serve(self) -> Iterator[int]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {exporter.token}":
                    exporter.refused += 1
                    self.send_error(401)
                    return
                exporter.authorized += 1
                body = generate_latest(exporter.registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threads = [
            threading.Thread(target=server.serve_forever, daemon=True),
            threading.Thread(target=self._ticks, daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            yield int(server.server_address[1])
        finally:
            self.stop.set()
            server.shutdown()
            server.server_close()

    def _ticks(self) -> None:
        while not self.stop.wait(0.2):
            self.tick()


@pytest.fixture
def prometheus(prometheus_dir: Path, tmp_path: Path) -> Iterator[tuple[str, StandInExporter]]:
    """A real Prometheus with deploy/prometheus's config (target and intervals changed) and rules."""
    token = (prometheus_dir / "farm.token").read_text().strip()
    exporter = StandInExporter(token)
    serving = exporter.serve()
    port = next(serving)
    config = (prometheus_dir / "prometheus.yml").read_text()
    for before, after in (
        ('targets: ["127.0.0.1:8750"]', f'targets: ["127.0.0.1:{port}"]'),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("scrape_timeout: 10s", "scrape_timeout: 1s"),
        ('targets: ["127.0.0.1:9093"]', f'targets: ["127.0.0.1:{lab.free_port()}"]'),
    ):
        assert config.count(before) == 1, before
        config = config.replace(before, after)
    (prometheus_dir / "prometheus.yml").write_text(config)
    web = f"127.0.0.1:{lab.free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            tool("prometheus", "prometheus"), f"--config.file={prometheus_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        lab.wait_until(lambda: ready(f"http://{web}/-/ready"), "Prometheus ready", seconds=60)
        yield f"http://{web}", exporter
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        next(serving, None)


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(base: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    reply.raise_for_status()
    result = reply.json()["data"]["result"]
    assert isinstance(result, list)
    return result


def test_prometheus_scrapes_with_the_token_and_every_panel_has_data(
    prometheus: tuple[str, StandInExporter],
) -> None:
    """Through prometheus.yml's job: the token from the file is sent; each dashboard query answers."""
    base, exporter = prometheus
    lab.wait_until(
        lambda: query(base, 'up{job="farm"} == 1'), "a successful scrape of the farm job", seconds=30
    )
    assert exporter.authorized > 0
    assert exporter.refused == 0
    # rate() and histogram_quantile() need a few scrapes: wait until every query has data.
    exprs = [(where, grafana_to_promql(expr)) for where, expr in expressions()]
    deadline = time.monotonic() + 60
    empty = exprs
    while empty and time.monotonic() < deadline:
        empty = [(where, expr) for where, expr in empty if not query(base, expr)]
        time.sleep(1)
    assert empty == [], f"queries without data: {empty}"


def test_prometheus_loads_and_evaluates_the_rules(prometheus: tuple[str, StandInExporter]) -> None:
    base, _ = prometheus

    def evaluated() -> bool:
        groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return bool(groups) and all(
            rule.get("lastEvaluation", "").startswith("2") for rule in groups[0]["rules"]
        )

    lab.wait_until(evaluated, "the farm rules evaluated", seconds=30)
    [group] = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert group["name"] == "farm"
    health = {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in group["rules"]}
    assert health == {rule["alert"]: ("ok", "") for rule in rules()}
