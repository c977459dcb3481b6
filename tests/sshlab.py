"""Real OpenSSH nodes in network namespaces, for tests that reach nodes over SSH as farm does.

    with ssh_lab(tmp_path, count=3) as lab:
        for node in lab.nodes:
            node.ssh("hostname")                   # OpenSSH ssh, strict host key checking
        inventory = lab.write_inventory(tmp_path / "inventory.yaml")
        node.cut_link() ... node.restore_link()

A lab is a bridge on this machine (``farmbr-<id>``, address ``10.213.<k>.1/24``, one /24 per
lab) and, per node, a network namespace (``farm-<id>-<i>``) joined to the bridge by a veth pair
(``fv-<id>-<i>`` on the host side, ``eth0`` inside, address ``10.213.<k>.<10+i>``). Each node runs
its own sshd (this machine's ``/usr/sbin/sshd``) on port 22 of its address, in its own UTS
namespace (``hostname`` prints the node's name), with its own ed25519 host key; the unprivileged
build user (``lab.BUILD_USER``, whom farm's inventory names) and root (for the tests' own checks)
log in with the lab's client key. The namespaces hold only a network (and a host name): files
and processes are this machine's. Nodes have no default route: they reach the bridge's address
(``lab.host_address``, where a test can bind a registry, see ``tests.lab.running_registry``) and
each other, nothing else.

An arm64 node (``lab.add_arm64_node()``) runs the sshd of the arm64 Debian root file system that
``deploy/lab/arm64-box.sh`` builds (``ensure_arm64_box()`` runs it; built once, then cached), in a
chroot under QEMU: over SSH it is an aarch64 machine with python3 and buildah. Its mounts (the box
bind-mounted onto itself, /proc with an arm64 /proc/cpuinfo over it, /dev, /sys, /run, and
per-node folders over /root, /tmp, /var/tmp, /var/lib/containers and the agent's workdir
/var/lib/farm) are made in a private mount namespace that ends with its processes: the host's
mount table never holds them, and the cached box is not written to.

Teardown kills every process in the nodes' namespaces and deletes namespaces, veths and the bridge,
even when the test failed. A lab whose owning process died (a crashed run) is removed by the next
lab that starts, or by ``python -m tests.sshlab cleanup``. Needs root, iproute2, util-linux and
openssh-server (``deploy/lab/setup.sh`` installs them).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests import lab
from tests.lab import LabError

__all__ = [
    "ARM64_BOX",
    "ARM64_BOX_SCRIPT",
    "SshLab",
    "SshNode",
    "cleanup_leftovers",
    "ensure_arm64_box",
    "lab_devices",
    "ssh_lab",
]

SSHD = "/usr/sbin/sshd"
STATE_DIR = Path("/run/farm-sshlab")  # one JSON file per live lab: who owns it, which /24
SUBNET_PREFIX = "10.213"
ARM64_BOX = Path(os.environ.get("FARM_ARM64_BOX", "/var/cache/farm-lab/arm64-bookworm"))
ARM64_BOX_SCRIPT = lab.REPO / "deploy" / "lab" / "arm64-box.sh"
_ARM64_BOX_STAMP = ".farm-box-complete"

# Names this module creates; the id is 6 hex digits. Anything matching them belongs to some lab.
_NETNS = re.compile(r"^farm-([0-9a-f]{6})-(\d+)$")
_BRIDGE = re.compile(r"^farmbr-([0-9a-f]{6})$")
_VETH = re.compile(r"^fv-([0-9a-f]{6})-(\d+)$")

# Every sshd of a lab; ``ssh_lab(sshd_options=...)`` adds to or overrides these.
DEFAULT_SSHD_OPTIONS: dict[str, str] = {
    "Port": "22",
    "PermitRootLogin": "prohibit-password",
    "PubkeyAuthentication": "yes",
    "UsePAM": "no",
    "StrictModes": "no",
    "PasswordAuthentication": "no",
    "KbdInteractiveAuthentication": "no",
    "MaxStartups": "64:30:256",
    "MaxSessions": "64",  # farm may open a channel per build slot on one connection
    "ClientAliveInterval": "5",
    "ClientAliveCountMax": "3",
    "UseDNS": "no",
    "Subsystem": "sftp internal-sftp",
    "LogLevel": "INFO",
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at ``path`` (replacing one there); returns ``ssh-ed25519 AAAA...``."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    lab.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    kind, blob = Path(f"{path}.pub").read_text().split()[:2]
    return f"{kind} {blob}"


def _ssh_banner(address: str, port: int, timeout: float) -> bool:
    """Does an SSH server answer at ``address:port`` with its version banner?"""
    try:
        with socket.create_connection((address, port), timeout=timeout) as probe:
            probe.settimeout(timeout)
            return probe.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    """A process's start time (jiffies since boot): with the pid, names a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _netns_pids(netns: str) -> list[int]:
    done = _ip("netns", "pids", netns, check=False)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def _kill_netns(netns: str, seconds: float = 10.0) -> None:
    """TERM, then KILL, every process in ``netns``; returns when none is left (or after ``seconds``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + seconds / 2
        while pids and time.monotonic() < deadline:
            # Zombies whose parent is gone are reaped by init; children of ours by Popen.wait.
            pids = [pid for pid in _netns_pids(netns) if _alive(pid)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _link_names() -> list[str]:
    out = _ip("-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _owner_alive(lab_id: str) -> bool:
    try:
        state = json.loads((STATE_DIR / f"{lab_id}.json").read_text())
    except (OSError, ValueError):
        return False
    pid = int(state["pid"])
    return _start_time(pid) == state["start"] and _alive(pid)  # a zombie owner is a dead one


def _cleanup_leftovers_locked() -> list[str]:
    links = _link_names()
    namespaces = _netns_names()
    ids: set[str] = set()
    for name in [*links, *namespaces]:
        for pattern in (_NETNS, _BRIDGE, _VETH):
            if match := pattern.match(name):
                ids.add(match.group(1))
    ids |= {path.stem for path in STATE_DIR.glob("*.json")}
    removed: list[str] = []
    for lab_id in sorted(ids):
        if _owner_alive(lab_id):
            continue
        for netns in namespaces:
            if (match := _NETNS.match(netns)) and match.group(1) == lab_id:
                _kill_netns(netns)
                _ip("netns", "del", netns, check=False)
                removed.append(netns)
        for link in links:
            if ((match := _VETH.match(link)) or (match := _BRIDGE.match(link))) and match.group(1) == lab_id:
                _ip("link", "del", link, check=False)
                removed.append(link)
        (STATE_DIR / f"{lab_id}.json").unlink(missing_ok=True)
    return removed


def lab_devices(lab_id: str) -> list[str]:
    """The namespaces, veths and bridge on this machine that belong to lab ``lab_id``."""
    return [
        name
        for name in _link_names() + _netns_names()
        if any((m := p.match(name)) and m.group(1) == lab_id for p in (_NETNS, _BRIDGE, _VETH))
    ]


def cleanup_leftovers() -> list[str]:
    """Remove namespaces, veths and bridges of labs whose owning process is gone; returns their names."""
    with _state_lock():
        return _cleanup_leftovers_locked()


class SshNode:
    """One node: a network namespace with an address, a link to the bridge, and an sshd."""

    def __init__(self, lab_: SshLab, index: int, name: str, box: Path | None) -> None:
        self.lab = lab_
        self.index = index
        self.name = name
        self.netns = f"farm-{lab_.id}-{index}"
        self.host_veth = f"fv-{lab_.id}-{index}"  # host side of the veth pair, on the bridge
        self.address = f"{SUBNET_PREFIX}.{lab_.subnet}.{10 + index}"
        self.port = 22
        self.box = box
        self.arch = "aarch64" if box is not None else os.uname().machine
        self.dir = lab_.dir / name  # this node's files on the host
        self.log = self.dir / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.user_dir: Path | None = None
        if box is None:
            etc = self.dir
            # The agent logs in as the unprivileged build user: its workdir and the authorized key
            # sshd reads as that user live where it can reach them (the lab's folder is root's).
            self.user_dir = lab.build_user_dir(f"sshlab-{lab_.id}-{name}")
            self.host_workdir = self.user_dir / "work"
            self.workdir = str(self.host_workdir)
        else:
            # Mounted in the box at /etc/farm-node and /var/lib/farm (see _box_command).
            etc = self.dir / "etc"
            self.host_workdir = self.dir / "work"
            self.workdir = "/var/lib/farm"
        self._etc = etc
        self._etc_in_node = "/etc/farm-node" if box is not None else str(etc)
        self.host_key = etc / "ssh_host_ed25519_key"
        self.host_public_key = ""  # "ssh-ed25519 AAAA..."
        self.sshd_config = etc / "sshd_config"

    def __repr__(self) -> str:
        return f"<SshNode {self.name} {self.address} netns={self.netns} arch={self.arch}>"

    # --- what clients need ---------------------------------------------------------------------

    @property
    def known_hosts_line(self) -> str:
        """This node's current host key as a known_hosts line: ``ADDR ssh-ed25519 AAAA...``."""
        host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{host} {self.host_public_key}"

    def inventory_entry(self) -> dict[str, object]:
        """This node as an entry of farm's inventory (``nodes:`` list item)."""
        entry: dict[str, object] = {
            "name": self.name,
            "host": self.address,
            "port": self.port,
            "user": lab.BUILD_USER,
            "identity_file": str(self.lab.client_key),
            "known_hosts": str(self.lab.known_hosts),
            "workdir": self.workdir,
        }
        if self.box is not None:
            # The box has no build user and no runc; its builds have no RUN steps (nested
            # emulation cannot run them), and it is root on purpose, chroot on purpose.
            entry |= {"user": "root", "isolation": "chroot"}
        return entry

    def ssh_argv(
        self, *command: str, known_hosts: Path | None = None, connect_timeout: int = 10
    ) -> list[str]:
        """An OpenSSH ``ssh`` command line to this node, as root, with strict host key checking.

        ``command`` words are joined by ssh and run by the node's shell. ``known_hosts`` defaults to
        the lab's file.
        """
        return [
            "ssh", "-F", "none", "-T",
            "-i", str(self.lab.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts or self.lab.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "LogLevel=ERROR",
            "-p", str(self.port),
            f"root@{self.address}",
            "--", *command,
        ]  # fmt: skip

    def ssh(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 120,
        known_hosts: Path | None = None,
        connect_timeout: int = 10,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the node with the real OpenSSH client (see ``ssh_argv``)."""
        argv = self.ssh_argv(*command, known_hosts=known_hosts, connect_timeout=connect_timeout)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise LabError(
                f"ssh to {self.name} ({command}) exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def run(
        self, command: str | Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` (argv, or a string for ``sh -c``) in the node's network namespace.

        Only the network is the node's: files, processes and host name are this machine's (for an
        arm64 node too: this does not enter its box).
        """
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise LabError(f"{argv} in {self.netns} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def pids(self) -> list[int]:
        """Every process in the node's network namespace: its sshd, sessions, agents, builds."""
        return _netns_pids(self.netns)

    @property
    def sshd_pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    # --- faults ----------------------------------------------------------------------------------

    def cut_link(self) -> None:
        """Take the node's link down (host side of its veth): packets to and from it are lost."""
        _ip("link", "set", self.host_veth, "down")

    def restore_link(self) -> None:
        _ip("link", "set", self.host_veth, "up")

    @property
    def link_up(self) -> bool:
        """Is the node's link administratively up (``restore_link``) rather than cut?"""
        out = _ip("-o", "link", "show", "dev", self.host_veth).stdout
        return "UP" in out.split("<", 1)[1].split(">", 1)[0].split(",")

    def change_host_key(self, *, update_known_hosts: bool = False) -> str:
        """Give the node a new host key and restart its sshd; returns the new known_hosts line.

        The lab's known_hosts file keeps the old key unless ``update_known_hosts`` (or a later
        ``lab.write_known_hosts()``): clients using it then see a changed host key.
        """
        self.stop_sshd()
        self.host_public_key = _keygen(self.host_key, f"{self.name}-host")
        self.start_sshd()
        self.wait_ready()
        if update_known_hosts:
            self.lab.write_known_hosts()
        return self.known_hosts_line

    def restart_sshd(self) -> None:
        """Stop the listening sshd and start it again (sessions already open carry on)."""
        self.stop_sshd()
        self.start_sshd()
        self.wait_ready()

    # --- life cycle ------------------------------------------------------------------------------

    def _create(self) -> None:
        """Namespace, veth pair on the bridge, addresses, keys, sshd config: everything but sshd."""
        self._etc.mkdir(parents=True, exist_ok=True)
        self.host_workdir.mkdir(parents=True, exist_ok=True)
        if self.user_dir is not None:
            shutil.chown(self.host_workdir, lab.BUILD_USER, lab.BUILD_USER)
        _ip("netns", "add", self.netns)
        self.lab._netns.append(self.netns)
        _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _ip("link", "set", self.host_veth, "master", self.lab.bridge, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        self.host_public_key = _keygen(self.host_key, f"{self.name}-host")
        if self.box is not None:
            for sub in ("home", "tmp", "vartmp", "containers"):
                (self.dir / sub).mkdir(exist_ok=True)
            (self.dir / "tmp").chmod(0o1777)
            (self.dir / "vartmp").chmod(0o1777)
            (self.dir / "cpuinfo").write_text(_arm64_cpuinfo(os.cpu_count() or 1))
            shutil.copyfile(self.lab.authorized_keys, self._etc / "authorized_keys")
            authorized = f"{self._etc_in_node}/authorized_keys"
        else:
            assert self.user_dir is not None
            authorized_file = self.user_dir / "authorized_keys"
            shutil.copyfile(self.lab.authorized_keys, authorized_file)
            shutil.chown(authorized_file, lab.BUILD_USER, lab.BUILD_USER)
            authorized_file.chmod(0o600)
            authorized = str(authorized_file)
        options = {
            **DEFAULT_SSHD_OPTIONS,
            "ListenAddress": self.address,
            "HostKey": f"{self._etc_in_node}/ssh_host_ed25519_key",
            "AuthorizedKeysFile": authorized,
            "PidFile": "/run/sshd.pid" if self.box is not None else str(self.dir / "sshd.pid"),
            **self.lab.sshd_options,
        }
        self.sshd_config.write_text("".join(f"{key} {value}\n" for key, value in options.items()))

    def _command(self) -> list[str]:
        if self.box is None:
            # Own UTS namespace: `hostname` on the node prints its name.
            script = 'hostname "$1" && exec /usr/sbin/sshd -D -e -f "$2"'
            args = [self.name, str(self.sshd_config)]
        else:
            script = _BOX_SCRIPT
            args = [str(self.box), str(self.dir), self.name]
        # A mount namespace of the node's own: its mounts end with its processes. Entered with
        # nsenter, not `ip netns exec`, whose fresh /sys lacks the cgroup file systems runc needs.
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"]
        unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
        return [*enter, *unshare, "--", "sh", "-euc", script, "sh", *args]

    def start_sshd(self) -> None:
        """Start the node's sshd (returns at once; ``wait_ready`` waits for its banner)."""
        if self.sshd_pid is not None:
            raise LabError(f"the sshd of {self.name} is already running (pid {self.sshd_pid})")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def wait_ready(self, seconds: float | None = None) -> None:
        """Poll until the sshd answers with its SSH banner on the node's address (from the host)."""
        emulated = self.box is not None
        limit = seconds if seconds is not None else (90.0 if emulated else 20.0)
        probe_timeout = 5.0 if emulated else 1.0
        process = self.process
        assert process is not None, "start_sshd first"
        lab.wait_until(
            lambda: process.poll() is not None or _ssh_banner(self.address, self.port, probe_timeout),
            f"sshd of {self.name} answering on {self.address}:{self.port}",
            limit,
        )
        if process.poll() is not None:
            raise LabError(f"the sshd of {self.name} exited {process.returncode}:\n{self.log_tail()}")

    def stop_sshd(self) -> None:
        """Stop the listening sshd only (as ``systemctl stop ssh`` would): sessions stay."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _destroy(self) -> None:
        _kill_netns(self.netns)
        self.stop_sshd()
        lab.unmount_below(self.dir)  # overlay storage of builds killed on this node
        _ip("link", "del", self.host_veth, check=False)
        _ip("netns", "del", self.netns, check=False)
        if self.user_dir is not None:
            shutil.rmtree(self.user_dir, ignore_errors=True)


# Run by sh inside the node's network namespace and a private mount namespace. $1 the box, $2 the
# node's folder, $3 its name. Every mount ends with the namespace, i.e. with the node's processes.
_BOX_SCRIPT = r"""
box=$1 node=$2
hostname "$3"
mount --bind "$box" "$box"
mount -t proc proc "$box/proc"
mount --bind "$node/cpuinfo" "$box/proc/cpuinfo"
mount --rbind /dev "$box/dev"
mount -t sysfs sysfs "$box/sys"
mount -t tmpfs -o mode=0755 tmpfs "$box/run"
mkdir -p "$box/run/sshd"
mount --bind "$node/etc" "$box/etc/farm-node"
mount --bind "$node/work" "$box/var/lib/farm"
mount --bind "$node/containers" "$box/var/lib/containers"
mount --bind "$node/home" "$box/root"
mount --bind "$node/tmp" "$box/tmp"
mount --bind "$node/vartmp" "$box/var/tmp"
exec chroot "$box" /usr/sbin/sshd -D -e -f /etc/farm-node/sshd_config
"""


def _arm64_cpuinfo(cpus: int) -> str:
    """What /proc/cpuinfo says on an arm64 machine (a Cortex-A76). QEMU user mode passes the host's
    x86 one through, where buildah finds no "CPU architecture" line and logs an error."""
    core = (
        "BogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc"
        " dcpop asimddp\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\n"
        "CPU revision\t: 1\n\n"
    )
    return "".join(f"processor\t: {cpu}\n{core}" for cpu in range(cpus))


class SshLab:
    """A bridge with a host address, a client key, a known_hosts file, and nodes."""

    def __init__(self, directory: Path, sshd_options: dict[str, str] | None = None) -> None:
        self.dir = directory
        self.sshd_options = dict(sshd_options or {})
        self.nodes: list[SshNode] = []
        self.id = ""
        self.subnet = -1
        self.bridge = ""
        self.host_address = ""
        self.client_key = directory / "client_key"  # ed25519, no passphrase
        self.client_public_key = ""
        self.authorized_keys = directory / "authorized_keys"
        self.known_hosts = directory / "known_hosts"
        self._netns: list[str] = []
        self._bridge_made = False

    def __repr__(self) -> str:
        return f"<SshLab {self.id} {self.bridge} {self.host_address} nodes={[n.name for n in self.nodes]}>"

    @property
    def network(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.0/24"

    def _open(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the SSH lab needs root (network namespaces, veths, a bridge, sshd)")
        for tool in ("ip", "unshare", "ssh", "ssh-keygen", SSHD):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is missing; {lab.SETUP_HINT}")
        self.dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        with _state_lock():
            _cleanup_leftovers_locked()
            taken = {path.stem for path in STATE_DIR.glob("*.json")} | {
                m.group(1) for name in _link_names() + _netns_names() for p in (_NETNS, _BRIDGE, _VETH)
                if (m := p.match(name))
            }  # fmt: skip
            self.id = next(i for i in iter(lambda: secrets.token_hex(3), None) if i not in taken)
            self.subnet = random.choice(sorted(set(range(256)) - _subnets_in_use()))
            pid = os.getpid()
            (STATE_DIR / f"{self.id}.json").write_text(
                json.dumps(
                    {"pid": pid, "start": _start_time(pid), "subnet": self.subnet, "dir": str(self.dir)}
                )
            )
            self.bridge = f"farmbr-{self.id}"
            self.host_address = f"{SUBNET_PREFIX}.{self.subnet}.1"
            # A fixed address: a bridge otherwise takes the lowest of its ports' MACs, so removing one
            # node's veth can change it, and frames the other nodes still send to the old MAC (the
            # FIN of a session killed at teardown) are flooded to the ports, never delivered here.
            bridge_mac = "02:fa:" + ":".join(self.id[i : i + 2] for i in range(0, 6, 2)) + ":01"
            _ip("link", "add", self.bridge, "address", bridge_mac, "type", "bridge")
            self._bridge_made = True
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        self.client_public_key = _keygen(self.client_key, f"farm-sshlab-{self.id}")
        self.authorized_keys.write_text(self.client_public_key + "\n")
        self.write_known_hosts()

    def add_nodes(self, count: int) -> list[SshNode]:
        """``count`` more nodes on this machine's own file system, started together."""
        first = len(self.nodes)
        nodes = [self._new_node(None, f"node{first + i}") for i in range(count)]
        self._start(nodes)
        return nodes

    def add_node(self, name: str | None = None) -> SshNode:
        node = self._new_node(None, name or f"node{len(self.nodes)}")
        self._start([node])
        return node

    def add_arm64_node(self, name: str | None = None, box: Path | None = None) -> SshNode:
        """A node whose sshd runs in the arm64 box (``ensure_arm64_box()`` must have built it)."""
        box = box or ARM64_BOX
        if not (box / _ARM64_BOX_STAMP).exists():
            raise LabError(f"no complete arm64 box at {box}: run {ARM64_BOX_SCRIPT} (ensure_arm64_box())")
        node = self._new_node(box, name or f"arm64-{len(self.nodes)}")
        self._start([node])
        return node

    def _new_node(self, box: Path | None, name: str) -> SshNode:
        if any(node.name == name for node in self.nodes):
            raise LabError(f"the lab already has a node named {name}")
        if len(self.nodes) >= 240:
            raise LabError("a lab holds at most 240 nodes")
        node = SshNode(self, len(self.nodes), name, box)
        self.nodes.append(node)
        node._create()
        return node

    def _start(self, nodes: list[SshNode]) -> None:
        self.write_known_hosts()
        for node in nodes:
            node.start_sshd()
        for node in nodes:
            node.wait_ready()

    def node(self, name: str) -> SshNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def write_known_hosts(self, path: Path | None = None) -> Path:
        """Write every node's current host key to ``path`` (default: the lab's known_hosts file)."""
        path = path or self.known_hosts
        path.write_text("".join(node.known_hosts_line + "\n" for node in self.nodes if node.host_public_key))
        return path

    def inventory_entries(self, nodes: Sequence[SshNode] | None = None) -> list[dict[str, object]]:
        return [node.inventory_entry() for node in (self.nodes if nodes is None else nodes)]

    def write_inventory(self, path: Path, nodes: Sequence[SshNode] | None = None, **fields: object) -> Path:
        """A farm inventory of the lab's nodes (or ``nodes``); ``fields`` are added to every node."""
        lines = ["nodes:"]
        for entry in self.inventory_entries(nodes):
            entry = {**entry, **fields}
            lines.append(
                "  - " + "\n    ".join(f"{key}: {json.dumps(value)}" for key, value in entry.items())
            )
        path.write_text("\n".join(lines) + "\n")
        return path

    def close(self) -> None:
        """Kill every node's processes; delete namespaces, veths, the bridge. Safe to call twice."""
        problems: list[str] = []
        for node in reversed(self.nodes):
            try:
                node._destroy()
            except Exception as exc:  # keep cleaning the rest
                problems.append(f"{node.name}: {exc}")
        for netns in self._netns:  # namespaces of nodes whose creation failed half-way
            if netns in _netns_names():
                _kill_netns(netns)
                _ip("netns", "del", netns, check=False)
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)
            self._bridge_made = False
        if self.id:
            (STATE_DIR / f"{self.id}.json").unlink(missing_ok=True)
        leftovers = lab_devices(self.id) if self.id else []
        if leftovers:
            problems.append(f"still there after teardown: {leftovers}")
        if problems:
            raise LabError("SSH lab teardown: " + "; ".join(problems))


def _subnets_in_use() -> set[int]:
    """The ``k`` of every 10.213.k.0/24 that an address on this machine or a live lab uses."""
    used: set[int] = set()
    out = _ip("-o", "-4", "addr", "show").stdout
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out):
        network = ipaddress.ip_network(f"{match.group(1)}/{match.group(2)}", strict=False)
        for k in range(256):
            if network.overlaps(ipaddress.ip_network(f"{SUBNET_PREFIX}.{k}.0/24")):
                used.add(k)
    for path in STATE_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.add(int(json.loads(path.read_text())["subnet"]))
    if len(used) >= 256:
        raise LabError(f"every {SUBNET_PREFIX}.k.0/24 is in use")
    return used


@contextlib.contextmanager
def ssh_lab(
    tmp_path: Path,
    count: int = 3,
    *,
    arm64: int = 0,
    box: Path | None = None,
    sshd_options: dict[str, str] | None = None,
) -> Iterator[SshLab]:
    """A lab with ``count`` nodes (``node0``...) and ``arm64`` box nodes (``arm64-<i>``), all ready.

    The lab's files (keys, sshd configs and logs, node workdirs) go under ``tmp_path/sshlab``.
    ``sshd_options`` add to or override ``DEFAULT_SSHD_OPTIONS`` for every node.
    """
    the_lab = SshLab(tmp_path / "sshlab", sshd_options)
    try:
        the_lab._open()
        if count:
            the_lab.add_nodes(count)
        for _ in range(arm64):
            the_lab.add_arm64_node(box=box)
        yield the_lab
    finally:
        the_lab.close()


def ensure_arm64_box(box: Path | None = None, timeout: float = 3600) -> Path:
    """Build the arm64 box with ``deploy/lab/arm64-box.sh`` (unless it is built already); returns it.

    The first build takes a few minutes (debootstrap and apt-get under QEMU); later calls only
    check the stamp.
    """
    box = box or ARM64_BOX
    # Always asked: the script only checks its stamp (and the recipe it records) when the box is built.
    done = subprocess.run(
        [str(ARM64_BOX_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FARM_ARM64_BOX": str(box)},
    )
    if done.returncode != 0 or not (box / _ARM64_BOX_STAMP).exists():
        raise LabError(f"{ARM64_BOX_SCRIPT} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return box


def _main(argv: list[str]) -> int:
    if argv == ["cleanup"]:
        removed = cleanup_leftovers()
        print(f"removed: {' '.join(removed)}" if removed else "nothing left over")
        return 0
    if argv == ["arm64-box"]:
        print(ensure_arm64_box())
        return 0
    print("usage: python -m tests.sshlab cleanup | arm64-box", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
