"""The benchmark's remote filesystem: sshd in a network namespace, reached over a veth pair
shaped with tc tbf, mounted on the host with sshfs (kernel_cache).

sshfs is a real network client whose page cache is shared by every local process, which is
what NFS and Lustre clients do, and every byte it reads crosses the veth pair, whose counters
(/sys/class/net) are the benchmark's ground truth for traffic. The kernel here has tbf but no
netem, so the link is shaped in rate only. Traffic never leaves the machine: the pair uses
10.231.0.0/30 inside a namespace this module creates and deletes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NAMESPACE = "fcnetbench"
HOST_LINK = "fcb-host"
SERVER_LINK = "fcb-srv"
HOST_IP = "10.231.0.1"
SERVER_IP = "10.231.0.2"
# Jumbo frames, as on the storage networks that carry NFS and Lustre. (The veth counters see
# GSO super-packets, so framing is ~0.8% of the bytes at 1500 as well; measured the same.)
MTU = 9000
REQUIRED_TOOLS = {"sshfs": "sshfs", "sshd": "openssh-server", "ssh-keygen": "openssh-client",
                  "ip": "iproute2", "tc": "iproute2", "fusermount3": "fuse3"}


class TestbedError(RuntimeError):
    """The testbed cannot be built; the message says what is missing."""


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command quietly; on failure raise with its stderr, which is what explains it."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
    return result


def in_namespace(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NAMESPACE, *cmd]


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def unmount(path: Path) -> None:
    """Unmount a FUSE mount if it is mounted; lazily if it is busy, so cleanup never hangs."""
    if not is_mounted(path):
        return
    if run("fusermount3", "-u", str(path), check=False).returncode != 0:
        run("fusermount3", "-u", "-z", str(path), check=False)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_tools() -> None:
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None
                      and not Path("/usr/sbin", tool).exists()})
    if missing:
        raise TestbedError(f"missing tools; install them with: apt-get install -y {' '.join(missing)}")


def remove_leftovers(state: Path, mountpoint: Path) -> None:
    """Take down what a run that was SIGKILLed left: its sshfs mount, its sshd (which ran in
    a session of its own), its namespace and veth pair."""
    unmount(mountpoint)
    pidfile = state / "sshd.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().split()[0])
        try:
            if "sshd" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        pidfile.unlink()
    if Path("/run/netns", NAMESPACE).exists():
        log.warning("removing namespace %s left by an earlier run", NAMESPACE)
        run("ip", "netns", "del", NAMESPACE, check=False)
    if Path("/sys/class/net", HOST_LINK).exists():
        run("ip", "link", "del", HOST_LINK, check=False)


def check_address_free() -> None:
    """Refuse to start if someone else (netfs.sh, say) already uses the pair's addresses."""
    addresses = run("ip", "-o", "addr", "show").stdout
    if f" {HOST_IP}/" in addresses:
        raise TestbedError(f"{HOST_IP} is already configured on this machine (is /work/shared/netfs.sh up? "
                           f"run 'netfs.sh down' first)")


@dataclass
class Testbed:
    """A shaped link to an sshd serving `export`, mounted at `mountpoint`.

    Use as a context manager: __exit__ tears everything down in reverse order, whatever
    happened, and so does a failure half-way through __enter__.
    """

    export: Path
    mountpoint: Path
    state: Path
    rate: str = "2gbit"
    _sshd: subprocess.Popen | None = None
    _sshfs: subprocess.Popen | None = None

    def __enter__(self) -> Testbed:
        check_tools()
        remove_leftovers(self.state, self.mountpoint)
        check_address_free()
        try:
            self._keys()
            self._link()
            self._start_sshd()
            self._mount()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        unmount(self.mountpoint)
        stop_process(self._sshfs)
        stop_process(self._sshd)
        self._sshfs = self._sshd = None
        run("ip", "link", "del", HOST_LINK, check=False)
        run("ip", "netns", "del", NAMESPACE, check=False)

    # ---- building ----------------------------------------------------------------------

    def _keys(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        for name in ("id", "hostkey"):
            if not (self.state / name).exists():
                run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.state / name))
        shutil.copy(self.state / "id.pub", self.state / "authorized_keys")
        settings = [f"ListenAddress {SERVER_IP}", f"HostKey {self.state / 'hostkey'}",
                    f"AuthorizedKeysFile {self.state / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password", "PasswordAuthentication no", "StrictModes no",
                    "UsePAM no", f"PidFile {self.state / 'sshd.pid'}", "Subsystem sftp internal-sftp"]
        (self.state / "sshd_config").write_text("\n".join(settings) + "\n")

    def _link(self) -> None:
        run("ip", "netns", "add", NAMESPACE)
        run("ip", "link", "add", HOST_LINK, "mtu", str(MTU), "type", "veth",
            "peer", "name", SERVER_LINK, "mtu", str(MTU))
        run("ip", "link", "set", SERVER_LINK, "netns", NAMESPACE)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_LINK)
        run("ip", "link", "set", HOST_LINK, "up")
        run(*in_namespace("ip", "addr", "add", f"{SERVER_IP}/30", "dev", SERVER_LINK))
        run(*in_namespace("ip", "link", "set", SERVER_LINK, "up"))
        run(*in_namespace("ip", "link", "set", "lo", "up"))
        # Shape the server's egress: that is the direction the file data travels.
        run(*in_namespace("tc", "qdisc", "replace", "dev", SERVER_LINK, "root", "tbf",
                          "rate", self.rate, "burst", "1mb", "latency", "100ms"))

    def _start_sshd(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        # -D keeps sshd our child (we stop it by pid); a session of its own keeps a Ctrl-C in
        # the terminal from killing it before sshfs is unmounted.
        self._sshd = subprocess.Popen(
            in_namespace("/usr/sbin/sshd", "-D", "-f", str(self.state / "sshd_config"),
                         "-E", str(self.state / "sshd.log")),
            start_new_session=True)

    def _wait_for_sshd(self, timeout: float = 10.0) -> None:
        """sshfs mounts before it connects and exits if the connection is refused, so sshd
        must be listening first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((SERVER_IP, 22), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._sshd.poll() is not None:
                    raise TestbedError(f"sshd does not listen; see {self.state / 'sshd.log'}") from None
                time.sleep(0.05)

    def _mount(self) -> None:
        self._wait_for_sshd()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # AES-GCM (AES-NI) costs ~40% less CPU than OpenSSH's default chacha20-poly1305: the
        # emulated network should burn as little of the machine's CPU as it can, since NFS
        # and Lustre clients pay no encryption at all.
        options = ",".join(["ro", "kernel_cache", f"IdentityFile={self.state / 'id'}",
                            "Ciphers=aes128-gcm@openssh.com", "StrictHostKeyChecking=no",
                            "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"])
        # -f: sshfs stays our child, so its pid (and its ssh's) is known for CPU accounting.
        with open(self.state / "sshfs.log", "w") as log_file:
            self._sshfs = subprocess.Popen(
                ["sshfs", "-f", "-o", options, f"root@{SERVER_IP}:{self.export}", str(self.mountpoint)],
                stdout=log_file, stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + 15
        while not (is_mounted(self.mountpoint) and self._serves_export()):
            if self._sshfs.poll() is not None or time.monotonic() > deadline:
                raise TestbedError(f"sshfs mount failed: {(self.state / 'sshfs.log').read_text().strip()}")
            time.sleep(0.05)

    def _serves_export(self) -> bool:
        """The mount lists what the export holds: sshfs is connected, not just mounted."""
        try:
            return sorted(os.listdir(self.mountpoint)) == sorted(os.listdir(self.export))
        except OSError:
            return False

    # ---- measuring ---------------------------------------------------------------------

    @staticmethod
    def link_bytes() -> int:
        """Bytes that crossed the pair so far, both directions, as counted at the host end
        (file data arrives as rx; requests and ACKs leave as tx)."""
        stats = Path("/sys/class/net", HOST_LINK, "statistics")
        return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())

    def transport_pids(self) -> list[int]:
        """sshd and its session, sshfs and its ssh: every process that moves the bytes."""
        roots = [p.pid for p in (self._sshd, self._sshfs) if p is not None]
        return roots + [child for pid in roots for child in descendants(pid)]


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found
