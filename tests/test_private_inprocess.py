"""Private dirs and files (fusecache.private), in process: what others could have planted or
can write is refused, and files are made readable by their owner only. The one step that
needs root, a directory owned by someone else, skips without it."""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
from pathlib import Path

import pytest

from fusecache import private


def test_private_dirs_refuse_what_others_could_plant_or_write(tmp_path):
    mine = tmp_path / "mine"
    private.ensure_dir(mine)
    assert mine.stat().st_mode & 0o777 == 0o700
    private.ensure_dir(mine)  # already ours: fine
    cases = {}
    cases["open"] = tmp_path / "open"
    cases["open"].mkdir()
    cases["open"].chmod(0o777)
    cases["sticky"] = tmp_path / "sticky"  # sticky protects what is in it, not the dir itself
    cases["sticky"].mkdir()
    cases["sticky"].chmod(0o1777)
    cases["link"] = tmp_path / "link"
    cases["link"].symlink_to(mine)
    cases["file"] = tmp_path / "file"
    cases["file"].touch()
    reasons = {"open": "writable by group or others", "sticky": "writable by group or others",
               "link": "is a symlink", "file": "is not a directory"}
    for name, path in cases.items():
        with pytest.raises(private.UntrustedPath, match=reasons[name]):
            private.ensure_dir(path)
    # check_ancestors: a dir anyone may write above the cache dir is refused, a sticky one is fine
    with pytest.raises(private.UntrustedPath, match="writable by group or others"):
        private.ensure_tree(cases["open"] / "cache", cases["open"] / "cache" / "x")
    private.ensure_tree(cases["sticky"] / "cache", cases["sticky"] / "cache" / "x" / "y")
    assert (cases["sticky"] / "cache" / "x" / "y").is_dir()
    private.check_ancestors(tmp_path / "does" / "not" / "exist")


def test_a_private_dir_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(private.UntrustedPath, match="owned by uid 65534"):
        private.ensure_dir(theirs)
    with pytest.raises(private.UntrustedPath, match="owned by uid 65534"):
        private.check_ancestors(theirs / "cache")


def test_a_refusal_names_each_allowed_owner_once():
    """A root daemon allows root and itself: uid 0 twice used to read "not 0 or 0" (audit 2, item 18)."""
    st = os.stat_result((stat.S_IFDIR | 0o700, 0, 0, 1, 65534, 65534, 0, 0, 0, 0))
    assert private.refusal(Path("/x"), st, (0, 0)) == "/x is owned by uid 65534, not 0"
    assert private.refusal(Path("/x"), st, (1000, 0)) == "/x is owned by uid 65534, not 0 or 1000"


def test_private_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    os.close(private.open_file(path, os.O_RDONLY))
    assert path.stat().st_mode & 0o777 == 0o600  # older versions made some 0644
    private.write_file(path, b"new content")
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["f"]  # no temporary file left
    assert private.read_file(path, 3) == b"new"
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError) as info:
        private.read_file(tmp_path / "link", 100)
    assert info.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="is not a regular file"):
        private.read_file(tmp_path / "pipe", 100)


def test_a_write_that_fails_partway_leaves_the_file_as_it_was(tmp_path):
    """A full disk writes part of a file, then refuses the rest: the file being replaced (the
    journal) keeps its old content, and no half-written copy is renamed over it. The file
    size limit (RLIMIT_FSIZE) makes the kernel do exactly that: a short write, then EFBIG."""
    path = tmp_path / "journal"
    private.write_file(path, b"old state")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as info:
            private.write_file(path, os.urandom(64 * 1024))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == b"old state" and not (tmp_path / "journal.tmp").exists()


def test_a_durable_file_is_synced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """pins.json was renamed over the last one before its bytes were synced: after a power cut
    the rename could survive and the bytes not (XFS; ext4 without auto_da_alloc), and an
    empty file lost every pin. (Found by review.)"""
    synced: list[int] = []
    replace = os.replace

    def fsync(fd: int) -> None:
        synced.append(fd)

    def replaced(src, dst, **kwargs) -> None:
        assert synced, "renamed over the old file before its bytes were synced"
        replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replaced)
    private.write_file(tmp_path / "pins.json", b'["a"]', durable=True)
    assert (tmp_path / "pins.json").read_bytes() == b'["a"]' and len(synced) == 2  # the file, then its directory
