"""The command line: every bad input is one line on stderr, a non-zero exit, nothing mounted
and nothing left running; the mount.fuse3 form and mount(8) work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import is_mounted, run_cli

MiB = 1 << 20


def daemons() -> set[int]:
    """pids of running fusecache daemons."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg == b"fusecache" for arg in cmdline) and b"mount" in cmdline:
            found.add(int(pid))
    return found


@pytest.fixture
def dirs(tmp_path):
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "f").write_text("data")
    return source, mountpoint, tmp_path / "cache"


def assert_refused(args, message: str, mountpoint: Path, status: int = 1) -> None:
    before = daemons()
    result = run_cli(*args, check=False)
    assert result.returncode == status, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusecache: ") and message in lines[0], lines[0]
    assert not is_mounted(mountpoint)
    assert daemons() <= before


@pytest.mark.fuse
@pytest.mark.parametrize("case, message, status", [
    ("missing-source", "does not exist", 1),
    ("source-is-file", "is not a directory", 1),
    ("missing-mountpoint", "does not exist", 1),
    ("mountpoint-is-file", "is not a directory", 1),
    ("mountpoint-not-empty", "is not empty", 1),
    ("cache-dir-unwritable", "is not writable", 1),
    ("unknown-option", "unknown option 'colour'", 2),
    ("malformed-size", "invalid chunk_size '4 parsecs'", 2),
    ("bad-chunk-size", "must be a power of two", 2),
    ("flag-needs-value", "needs a value", 2),
    ("bad-number", "invalid streams 'many'", 2),
    ("empty-option", "empty option", 2),
])
def test_bad_mount_input(dirs, case, message, status):
    source, mountpoint, cache = dirs
    args = ["mount", source, mountpoint, "--cache-dir", cache]
    if case == "missing-source":
        args[1] = source / "nope"
    elif case == "source-is-file":
        args[1] = source / "f"
    elif case == "missing-mountpoint":
        args[2] = mountpoint / "nope"
    elif case == "mountpoint-is-file":
        args[2] = source / "f"
    elif case == "mountpoint-not-empty":
        (mountpoint / "x").write_text("")
    elif case == "cache-dir-unwritable":
        args[4] = source / "f" / "cache"
    else:
        option = {"unknown-option": "colour=blue", "malformed-size": "chunk_size=4 parsecs",
                  "bad-chunk-size": "chunk_size=3M", "flag-needs-value": "cache_dir",
                  "bad-number": "streams=many", "empty-option": "allow_other,,ro"}[case]
        args += ["-o", option]
    assert_refused(args, message, mountpoint, status)


@pytest.mark.fuse
def test_already_mounted_mountpoint_is_refused(dirs, make_mount):
    source, _mountpoint, cache = dirs
    m = make_mount(source)
    other_cache = cache.parent / "cache2"
    result = run_cli("mount", source, m.mountpoint, "--cache-dir", other_cache, check=False)
    assert result.returncode == 1
    assert "already mounted" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (m.mountpoint / "f").read_text() == "data"


@pytest.mark.fuse
def test_missing_dev_fuse_is_refused(dirs, tmp_path):
    """In a private mount namespace, /dev/fuse is replaced by an empty regular file."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    source, mountpoint, cache = dirs
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    script = (f"mount --bind {empty} /dev/fuse && exec {shutil.which('python3')} -m fusecache "
              f"mount {source} {mountpoint} --cache-dir {cache}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 1
    assert "/dev/fuse" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.fuse
def test_mount_fuse3_form_with_options(dirs):
    """What mount.fuse3 runs for `mount -t fuse.fusecache` and fstab lines."""
    source, mountpoint, cache = dirs
    try:
        run_cli(source, mountpoint, "-o", f"cache_dir={cache},chunk_size=1M,readahead=off,rw,nodev,nosuid,_netdev")
        assert (mountpoint / "f").read_text() == "data"
        assert any(cache.rglob("*.idx"))
    finally:
        run_cli("umount", mountpoint, check=False)
    assert not is_mounted(mountpoint)


@pytest.mark.fuse
def test_mount_command_with_type_fuse_fusecache(dirs):
    # mount.fuse3 runs the helper through sh with the default PATH, not the caller's
    if shutil.which("fusecache", path=os.defpath + ":/usr/local/bin:/usr/sbin:/sbin") is None:
        pytest.skip("fusecache is not installed where mount.fuse3 looks (.ci/setup links it)")
    source, mountpoint, cache = dirs
    try:
        subprocess.run(["mount", "-t", "fuse.fusecache", str(source), str(mountpoint),
                        "-o", f"cache_dir={cache},allow_other"], check=True, capture_output=True, timeout=60)
        assert (mountpoint / "f").read_text() == "data"
        fstype = next(line.split()[2] for line in open("/proc/mounts") if line.split()[1] == str(mountpoint))
        assert fstype == "fuse.fusecache"
    finally:
        run_cli("umount", mountpoint, check=False)


def test_umount_of_a_non_fusecache_path_fails(tmp_path):
    result = run_cli("umount", tmp_path, check=False)
    assert result.returncode == 1 and "is not a fusecache mount" in result.stderr


def test_status_and_prefetch_outside_a_mount_fail(tmp_path):
    assert run_cli("status", tmp_path, check=False).returncode == 1
    result = run_cli("prefetch", tmp_path, check=False)
    assert result.returncode == 1 and "not inside a fusecache mount" in result.stderr


def test_unknown_command_is_usage_error():
    result = run_cli("frobnicate", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.fuse
def test_status_json(dirs, make_mount):
    source, _mountpoint, _cache = dirs
    (source / "w.safetensors").write_bytes(b"z" * (3 * MiB))
    m = make_mount(source)
    assert (m.mountpoint / "w.safetensors").read_bytes() == b"z" * (3 * MiB)
    report = json.loads(run_cli("status", m.mountpoint, "--json").stdout)
    assert report["pid"] == m.pid and report["source"] == str(source)
    assert report["metrics"]["bytes_served"] == 3 * MiB
    files = {f["path"]: f for f in report["files"]}
    assert files["w.safetensors"]["cached"] == files["w.safetensors"]["size"] == 3 * MiB
    human = run_cli("status", m.mountpoint).stdout
    assert "w.safetensors" in human and "100.0%" in human
