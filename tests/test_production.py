"""Running it in production: cache size and eviction, pins, a full cache filesystem, metrics
exporters, signals, the foreground mode systemd runs, and the shipped systemd units."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import file_bytes, is_mounted, run_cli, wait_gone
from .helpers import fill

MiB = 1 << 20
SYSTEMD = Path(__file__).parent.parent / "systemd"


def cached(m) -> dict[str, int]:
    report = json.loads(run_cli("cache", "ls", m.mountpoint, "--json").stdout)
    return {f["path"]: f["cached"] for f in report["files"] if f["cached"]}


@pytest.mark.fuse
def test_lru_eviction_keeps_the_cache_under_its_size(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {name: 4 * MiB for name in "abcd"}, seed=21)
    m = make_mount(source, ["cache_size=10M", "readahead=off"])
    for name in "ab":
        assert file_bytes(m.mountpoint / name) == contents[name]
    time.sleep(0.05)
    assert file_bytes(m.mountpoint / "a") == contents["a"]  # a is now more recent than b
    assert file_bytes(m.mountpoint / "c") == contents["c"]  # evicts b, the least recently used
    assert cached(m) == {"a": 4 * MiB, "c": 4 * MiB}
    assert file_bytes(m.mountpoint / "d") == contents["d"]  # evicts a
    assert cached(m) == {"c": 4 * MiB, "d": 4 * MiB}
    assert m.status()["cache_bytes"] <= 10 * MiB
    assert len(list(m.cache_dir.rglob("*.data"))) == 2  # evicted files are gone from disk
    assert m.metrics()["files_evicted"] == 2


@pytest.mark.fuse
def test_open_and_pinned_files_are_never_evicted_reads_go_through(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {"open": 4 * MiB, "pinned": 4 * MiB, "other": 4 * MiB}, seed=22)
    m = make_mount(source, ["cache_size=9M", "readahead=off"])
    run_cli("pin", m.mountpoint / "pinned")
    with open(m.mountpoint / "open", "rb") as held:
        assert held.read() == contents["open"]
        # no room: both cached files are protected, so "other" is served straight from the source
        assert file_bytes(m.mountpoint / "other") == contents["other"]
        assert set(cached(m)) == {"open", "pinned"}
        assert m.metrics()["bytes_read_through"] >= 4 * MiB
    run_cli("unpin", m.mountpoint / "pinned")
    result = run_cli("cache", "clear", m.mountpoint)
    assert "evicted 3 file(s)" in result.stdout  # open, pinned, and the empty entry of other
    assert cached(m) == {}
    assert file_bytes(m.mountpoint / "pinned") == contents["pinned"]


@pytest.mark.fuse
def test_full_cache_filesystem_falls_back_to_read_through(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {"x.bin": 12 * MiB, "y.bin": 6 * MiB}, seed=23)
    small = tmp_path / "small-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        # a limit far above what the filesystem holds: writes hit ENOSPC
        m = make_mount(source, ["cache_size=1G", "readahead=off", "chunk_size=1M"], cache_dir=small)
        for name, data in contents.items():
            assert file_bytes(m.mountpoint / name) == data
            assert file_bytes(m.mountpoint / name) == data
        metrics = m.metrics()
        assert metrics["bytes_read_through"] > 0
        assert metrics["errors"].get("ENOSPC", 0) >= 1
        m.unmount()
    finally:
        subprocess.run(["umount", "-l", str(small)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fuse
def test_prometheus_endpoint_and_textfile(tmp_path, make_mount):
    source = tmp_path / "src"
    contents = fill(source, {"m.safetensors": 5 * MiB}, seed=24)
    port = free_port()
    textfile = tmp_path / "fusecache.prom"
    m = make_mount(source, [f"metrics_addr=127.0.0.1:{port}", f"metrics_textfile={textfile}"])
    assert file_bytes(m.mountpoint / "m.safetensors") == contents["m.safetensors"]
    taken = sum(p.lstat().st_blocks * 512 for p in m.cache_dir.rglob("objects/*/*"))  # data and index
    deadline = time.monotonic() + 10
    while True:  # gauges are sampled once a second: until a sample after the read
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                  if line and not line.startswith("#")}
        if values["fusecache_cache_bytes"] == taken or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert values["fusecache_source_bytes_total"] == 5 * MiB
    assert values["fusecache_cache_bytes"] == taken
    assert values['fusecache_fetch_seconds_count'] >= 1
    assert 'fusecache_served_bytes_total{origin="cache"}' in values
    for _ in range(100):
        if textfile.exists():
            break
        time.sleep(0.1)
    assert "fusecache_source_bytes_total" in textfile.read_text()


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_keeps_the_cache(tmp_path, make_mount, signum):
    source = tmp_path / "src"
    contents = fill(source, {"w.bin": 6 * MiB}, seed=25)
    m = make_mount(source)
    assert file_bytes(m.mountpoint / "w.bin") == contents["w.bin"]
    os.kill(m.pid, signum)
    wait_gone(m.pid)
    assert not is_mounted(m.mountpoint)
    m.mount()
    assert file_bytes(m.mountpoint / "w.bin") == contents["w.bin"]
    assert m.metrics()["bytes_from_source"] == 0


@pytest.mark.fuse
def test_foreground_mode_logs_to_stderr_and_stops_on_sigterm(tmp_path):
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    fill(source, {"f": 1000})
    mountpoint.mkdir()
    proc = subprocess.Popen(["python3", "-m", "fusecache", "mount", str(source), str(mountpoint), "--foreground",
                             "--cache-dir", str(tmp_path / "cache"), "--log-level", "debug"],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mountpoint / "f").read_bytes() == (source / "f").read_bytes()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "DEBUG" in stderr and "unmounted" in stderr
        assert not is_mounted(mountpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


INSTALLED = "/usr/local/bin/fusecache"  # where the units expect the command (docs/operations.md)


@pytest.mark.parametrize("unit, as_name", [("fast-models.mount", "fast-models.mount"),
                                           ("fusecache@.service", "fusecache@fast-models.service")])
def test_systemd_units_verify(tmp_path, unit, as_name):
    """systemd-analyze checks that each command a unit runs is an executable file. This
    machine's own install (or none, or one this user cannot reach) is not what is tested:
    the unit's command is verified against an executable stand-in in its place."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    stand_in = tmp_path / "bin" / "fusecache"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    text = (SYSTEMD / unit).read_text()
    assert unit.endswith(".mount") or f"ExecStart={INSTALLED} mount " in text
    (tmp_path / as_name).write_text(text.replace(INSTALLED, str(stand_in)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / as_name)], capture_output=True, text=True)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if as_name in line or unit in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
