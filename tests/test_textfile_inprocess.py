"""The node-exporter textfile: written where the operator said, never where another local
user steers a root daemon (audit 2, item 1), and refused before mounting when unusable."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fusecache import textfile


def _in_thread(fn) -> threading.Thread:
    """A started thread that waits for `go` before running fn (so its ident is known first)."""
    go = threading.Event()
    thread = threading.Thread(target=lambda: (go.wait(), fn()))
    thread.go = go  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_link_planted_under_a_predictable_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "fusecache.prom"
    failures: list[BaseException] = []

    def write() -> None:
        try:
            textfile.write(target, b"fusecache_up 1\n")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)

    thread = _in_thread(write)
    # the names prometheus_client's write_to_textfile would have opened, and the target itself
    os.symlink(victim, f"{target}.{os.getpid()}.{thread.ident}")
    os.symlink(victim, target)
    thread.go.set()  # type: ignore[attr-defined]
    thread.join()
    assert not failures
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_bytes() == b"fusecache_up 1\n"
    assert target.stat().st_mode & 0o777 == 0o644  # node_exporter, another user, reads it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "fusecache.prom", f"fusecache.prom.{os.getpid()}.{thread.ident}"])  # no temporary left


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all and not sticky: anyone may rename what we write
    with pytest.raises(textfile.TextfileError, match="writable by group or others"):
        textfile.check(shared / "fusecache.prom")
    with pytest.raises(textfile.TextfileError, match="writable by group or others"):
        textfile.write(shared / "fusecache.prom", b"x\n")
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot touch what is ours
    textfile.check(shared / "fusecache.prom")
    textfile.write(shared / "fusecache.prom", b"x\n")
    assert (shared / "fusecache.prom").read_bytes() == b"x\n"


def test_a_missing_directory_is_refused_before_mounting(tmp_path: Path) -> None:
    with pytest.raises(textfile.TextfileError, match=r"directory .*/nowhere does not exist"):
        textfile.check(tmp_path / "nowhere" / "fusecache.prom")


def test_a_directory_that_is_a_link_is_not_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):
        textfile.write(tmp_path / "link" / "fusecache.prom", b"x\n")
    assert list(real.iterdir()) == []


def test_a_directory_of_a_kernel_filesystem_is_refused_before_mounting() -> None:
    """/proc/self/x.prom passed every check (root owns /proc/self), then failed each write,
    quietly, in the log. (Found by review.)"""
    with pytest.raises(textfile.TextfileError, match="is on proc, not a filesystem of files"):
        textfile.check(Path("/proc/self/x.prom"))
