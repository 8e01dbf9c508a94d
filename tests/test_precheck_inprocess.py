"""The checks before mounting (fusecache.precheck.check_request), in process: each refusal is a
one-line MountError, given before anything is mounted; a request that passes leaves the store
prepared and locked. No mount, no root: /dev/fuse is only checked to be a character device
this user may open, so a user without it checks against /dev/null."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusecache.config import build_config
from fusecache import precheck
from fusecache.precheck import MountError, check_request
from fusecache.store import CacheStore


@pytest.fixture
def paths(tmp_path, monkeypatch):
    if not os.access(precheck.FUSE_DEVICE, os.R_OK | os.W_OK):
        monkeypatch.setattr(precheck, "FUSE_DEVICE", "/dev/null")
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    (source / "sub").mkdir(parents=True)
    mountpoint.mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(source)
    return source, mountpoint, tmp_path / "cache"


def refusal(source: Path, mountpoint: Path, cache: Path, *options: str) -> str:
    with pytest.raises(MountError) as info:
        check_request(build_config(str(source), str(mountpoint), list(options), cache_dir=cache))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_request_that_passes_gets_the_store_locked(paths):
    source, mountpoint, cache = paths
    store = check_request(build_config(str(source), str(mountpoint), [], cache_dir=cache))
    assert store.root.is_dir() and (store.root / "lock").read_text() == f"{os.getpid()}\n"
    other = CacheStore(cache, os.path.realpath(source))
    with pytest.raises(Exception, match=f"is in use by another fusecache mount of .* \\(pid {os.getpid()}\\)"):
        other.lock()
    assert refusal(source, mountpoint, cache).endswith(f"(pid {os.getpid()})")


@pytest.mark.parametrize("case, message", [
    ("missing-source", "does not exist"),
    ("source-is-file", "is not a directory"),
    ("missing-mountpoint", "does not exist"),
    ("mountpoint-is-file", "is not a directory"),
    ("mountpoint-not-empty", "is not empty"),
    ("mountpoint-is-source", "source and mountpoint must differ"),
    ("mountpoint-in-source-by-symlink", "must be outside the source"),
    ("source-in-mountpoint", "must be outside the mountpoint"),
    ("cache-in-mountpoint", "must be outside the mountpoint"),
    ("cache-in-source-by-symlink", "must be outside the source"),
    ("cache-dir-unwritable", "is not writable"),
    ("textfile-nowhere", "does not exist"),
    ("no-fuse-device", "is missing or not accessible: load the fuse module"),
])
def test_refusals(paths, monkeypatch, case, message):
    source, mountpoint, cache = paths
    tmp = source.parent
    options = []
    if case == "missing-source":
        source = source / "nope"
    elif case == "source-is-file":
        source = tmp / "file"
    elif case == "missing-mountpoint":
        mountpoint = mountpoint / "nope"
    elif case == "mountpoint-is-file":
        mountpoint = tmp / "file"
    elif case == "mountpoint-not-empty":
        (mountpoint / "x").write_text("")
    elif case == "mountpoint-is-source":
        mountpoint = source
    elif case == "mountpoint-in-source-by-symlink":
        mountpoint = tmp / "link" / "sub"
    elif case == "source-in-mountpoint":
        (mountpoint / "src").mkdir()
        source = mountpoint / "src"
    elif case == "cache-in-mountpoint":
        cache = mountpoint / "cache"
    elif case == "cache-in-source-by-symlink":
        cache = tmp / "link" / "cache"
    elif case == "cache-dir-unwritable":
        cache = tmp / "file" / "cache"
    elif case == "no-fuse-device":
        monkeypatch.setattr(precheck, "FUSE_DEVICE", str(tmp / "no-fuse"))
    elif case == "textfile-nowhere":
        options = [f"metrics_textfile={tmp / 'nowhere' / 'f.prom'}"]
    assert message in refusal(source, mountpoint, cache, *options)
    assert not cache.exists() or case == "cache-dir-unwritable"
