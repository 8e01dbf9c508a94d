"""The daemon's supporting modules, in process: no mount, no root (the one step that needs root,
a directory owned by someone else, skips without it).

What it proves: the control channel answers unknown, malformed, oversized and failing
requests with a one-line error and keeps serving; private dirs and files refuse what others
could have planted or can write, and files are made readable by their owner only; the
metrics counters, their snapshot and their Prometheus exposition agree; mountinfo is parsed
into the mounts this process sees, and a path that is no mount is told apart without
touching it; synthetic checkpoints load to the same digest in any order.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from fusecache import checkpoint, linux, mounts, private
from fusecache.config import ConfigError, MountConfig, build_config, runtime_dir
from fusecache.control import MAX_REQUEST, ControlError, ControlServer, call, send_request, socket_path
from fusecache.metrics import FETCH_BUCKETS, Metrics, prometheus_registry

# ---- control channel ---------------------------------------------------------------------


async def test_the_control_channel_answers_bad_requests_with_one_line_errors(tmp_path):
    async def echo(request: dict) -> dict:
        return {"echo": request["value"]}

    async def broken(request: dict) -> dict:
        raise RuntimeError("boom")

    async def refuses(request: dict) -> dict:
        raise ControlError("no such file in the cache")

    path = tmp_path / "c.sock"
    server = ControlServer(path, {"echo": echo, "broken": broken, "refuses": refuses}, owner_uid=os.getuid())

    def exchange(request) -> dict:
        return send_request(path, request, 5.0, "/mnt")

    def raw(data: bytes) -> dict:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return json.loads(sock.makefile("rb").read())

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert path.stat().st_mode & 0o777 == 0o600
        assert await trio.to_thread.run_sync(exchange, {"command": "echo", "value": [1, "x"]}) == {"echo": [1, "x"]}
        for request, message in (({"command": "nope"}, "unknown command 'nope'"),
                                 ({"command": "broken"}, "internal error: boom"),
                                 ({"command": "refuses"}, "no such file in the cache")):
            with pytest.raises(ControlError) as info:
                await trio.to_thread.run_sync(exchange, request)
            assert str(info.value) == message
        for data in (b"not json\n", b'{"no": "command"}\n', b"[1, 2]\n", b""):
            assert await trio.to_thread.run_sync(raw, data) == {"error": "malformed request"}
        assert await trio.to_thread.run_sync(raw, b"x" * (MAX_REQUEST + 10)) == {"error": "request too large"}
        # still serving after all that
        assert await trio.to_thread.run_sync(exchange, {"command": "echo", "value": 1}) == {"echo": 1}
        nursery.cancel_scope.cancel()
    assert not path.exists()  # the socket goes with the server


async def test_only_root_and_the_owner_may_use_the_control_channel(tmp_path):
    async def status(request: dict) -> dict:
        return {"ok": True}

    path = tmp_path / "c.sock"
    server = ControlServer(path, {"status": status}, owner_uid=os.getuid() + 1)  # mounted by someone else
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        if os.getuid() == 0:  # root may control every mount
            assert await trio.to_thread.run_sync(send_request, path, {"command": "status"}, 5.0, "/mnt") == {"ok": True}
        else:
            with pytest.raises(ControlError, match="^permission denied: only root or the user who mounted"):
                await trio.to_thread.run_sync(send_request, path, {"command": "status"}, 5.0, "/mnt")
        nursery.cancel_scope.cancel()


def test_socket_paths_and_unmounted_paths(tmp_path):
    a = socket_path("/mnt/a", 0)
    assert a == socket_path("/mnt/a", 0) != socket_path("/mnt/b", 0)
    assert a.parent == runtime_dir(0) == Path("/run/fusecache") and a.suffix == ".sock"
    assert socket_path("/mnt/a", 4242).parent == runtime_dir(4242)
    with pytest.raises(ControlError, match="is not served by a running fusecache daemon"):
        call(str(tmp_path), {"command": "status"})


def test_an_exited_process_not_yet_reaped_counts_as_gone():
    """umount waits for the daemon to exit; once exited it is a zombie until init reaps it,
    which must not keep umount waiting."""
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, threading, time; "
                              "threading.Thread(target=time.sleep, args=(1.0,)).start(); "
                              "ctypes.CDLL(None).pthread_exit(None)"])
    time.sleep(0.5)  # its main thread has exited (a zombie), another still runs: descriptors still open
    assert Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert mounts.is_running(child.pid)
    assert mounts.wait_for_exit(child.pid, 10)
    assert Path(f"/proc/{child.pid}").exists()  # a zombie: exited, not reaped (we never waited)
    assert not mounts.wait_for_exit(os.getpid(), 0.05)
    child.wait()
    assert not mounts.is_running(child.pid)


# ---- private dirs and files --------------------------------------------------------------

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
    (tmp_path / "f.tmp").write_bytes(b"left by a crash")
    private.write_file(path, b"new content")
    assert path.read_bytes() == b"new content" and not (tmp_path / "f.tmp").exists()
    assert private.read_file(path, 3) == b"new"
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError) as info:
        private.read_file(tmp_path / "link", 100)
    assert info.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="is not a regular file"):
        private.read_file(tmp_path / "pipe", 100)


# ---- metrics ------------------------------------------------------------------------------

def test_metrics_snapshot_and_prometheus_agree():
    m = Metrics()
    snap = m.snapshot()
    assert snap["hit_ratio"] is None and snap["source_rate"] == 0.0 and "_samples" not in snap
    m.bytes_from_source = 1000
    m.bytes_served, m.bytes_served_from_cache, m.bytes_read_through = 700, 400, 100
    m.chunk_hits, m.chunk_misses = 3, 1
    m.count_error("EIO")
    m.count_error("EIO")
    m.count_error("ESTALE")
    m.observe_fetch(0.003)
    m.observe_fetch(100.0)
    m.cache_bytes, m.cache_limit_bytes = 5, 10
    snap = m.snapshot()
    assert snap["hit_ratio"] == 400 / 700 and snap["errors"] == {"EIO": 2, "ESTALE": 1} and snap["fetch_errors"] == 3
    assert snap["fetch_seconds_buckets"][FETCH_BUCKETS.index(0.005)] == 1 and snap["fetch_seconds_buckets"][-1] == 1
    json.dumps(snap)  # what the control channel sends

    registry = prometheus_registry(m)
    value = registry.get_sample_value
    assert value("fusecache_source_bytes_total") == 1000
    assert value("fusecache_served_bytes_total", {"origin": "cache"}) == 400
    assert value("fusecache_served_bytes_total", {"origin": "fetched"}) == 200
    assert value("fusecache_served_bytes_total", {"origin": "read_through"}) == 100
    assert value("fusecache_chunk_lookups_total", {"result": "miss"}) == 1
    m.passthrough_opens, m.passthrough_bytes = 2, 2000  # a 1000-byte file opened twice by the kernel
    assert m.snapshot()["hit_ratio"] == (400 + 2000) / (700 + 2000)
    assert registry.get_sample_value("fusecache_passthrough_bytes_total") == 2000
    assert value("fusecache_errors_total", {"kind": "EIO"}) == 2
    assert value("fusecache_fetch_seconds_bucket", {"le": "0.001"}) == 0
    assert value("fusecache_fetch_seconds_bucket", {"le": "0.005"}) == 1
    assert value("fusecache_fetch_seconds_bucket", {"le": "10.0"}) == 1
    assert value("fusecache_fetch_seconds_bucket", {"le": "+Inf"}) == 2
    assert value("fusecache_fetch_seconds_sum") == pytest.approx(100.003)
    assert value("fusecache_cache_limit_bytes") == 10


def test_source_rate_from_samples(monkeypatch):
    m = Metrics()
    now = [100.0]
    monkeypatch.setattr("fusecache.metrics.time.monotonic", lambda: now[0])
    m.sample()
    assert m.source_rate() == 0.0
    m.bytes_from_source = 3000
    now[0] = 102.0
    m.sample()
    assert m.source_rate() == 1500.0


# ---- mounts -------------------------------------------------------------------------------

def test_mountinfo_lists_the_mounts_this_process_sees(tmp_path):
    table = mounts.mount_table()
    root = mounts.find_mount("/")
    assert root is not None and root in table and root.fstype
    if os.path.ismount("/proc"):
        assert mounts.find_mount("/proc").fstype == "proc"
        assert mounts.fstype_of("/proc/self/status") == "proc"
    assert mounts.find_mount(str(tmp_path)) is None
    assert mounts.fstype_of(str(tmp_path)) == mounts.fstype_of(str(tmp_path.parent))
    # a path that is no mount is resolved through its parent only
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert mounts.resolve_mountpoint(str(tmp_path / "alias" / "mnt")) == os.path.realpath(tmp_path / "real") + "/mnt"
    assert mounts.resolve_mountpoint("/") == "/"
    assert not mounts.is_stale(str(tmp_path)) and not mounts.is_stale(str(tmp_path / "missing"))
    info = mounts.MountInfo(0, 42, "/mnt", "fuse.fusecache", "/src", "rw,user_id=1000,group_id=1000")
    assert info.owner_uid == 1000
    assert mounts.MountInfo(0, 42, "/mnt", "ext4", "/dev/x", "rw").owner_uid is None
    mounts.tune_fuse_mount(str(tmp_path), 4096, 64)  # not mounted: a warning, nothing written
    with pytest.raises(OSError):
        mounts.unmount(str(tmp_path))  # not mounted: a one-line error


def test_wait_for_exit():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert mounts.wait_for_exit(child.pid, 5.0)
    assert not mounts.wait_for_exit(os.getpid(), 0.05)


# ---- linux --------------------------------------------------------------------------------

def test_openat2_refuses_symlinks_and_escapes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").touch()
    (tmp_path / "link").symlink_to("d")
    top = os.open(tmp_path, os.O_PATH)
    try:
        if not linux.has_openat2(top):
            pytest.skip("no openat2 on this kernel")
        os.close(linux.openat2(top, "d/f", os.O_RDONLY))
        for path, err in (("link/f", errno.ELOOP), ("../x", errno.EXDEV), ("/etc", errno.EXDEV),
                          ("missing", errno.ENOENT)):
            with pytest.raises(OSError) as info:
                linux.openat2(top, path, os.O_RDONLY)
            assert info.value.errno == err, path
    finally:
        os.close(top)
    assert not linux.has_openat2(-1)  # a failure of the probe means: resolve per component


def test_getdents64_errors():
    with pytest.raises(OSError) as info:
        linux.getdents64(-1)
    assert info.value.errno == errno.EBADF


# ---- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["chunk_size=96K"], "must be a power of two"),
    (["chunk_size=512M", "stream_read_size=1G"], "must be <= 256M"),
    (["stream_read_size=6M"], "must be a multiple of chunk_size"),
    (["stream_read_size=2G"], "must be <= 1G"),
    (["sequential_window=2G"], "must be <= 1G"),
    (["cache_size=100K"], "must be at least 1M"),
    (["cache_size=200%"], "between 0.1 and 100.0"),
    (["readahead=maybe"], "expected one of all, shards, off"),
    (["allow_other=perhaps"], "expected on/off"),
    (["streams"], "needs a value"),
    (["attr_timeout=soon"], "expected a number"),
    (["cache_dir="], "empty path"),
])
def test_invalid_settings_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config("/src", "/mnt", options)
    assert "\n" not in str(info.value)


def test_buffers_must_fit_in_half_the_memory():
    cfg = MountConfig(source=Path("/src"), mountpoint=Path("/mnt"))
    cfg.validate(memory=lambda: 64 << 30)
    with pytest.raises(ConfigError, match="the daemon's buffers would take"):
        cfg.validate(memory=lambda: cfg.buffer_bytes())
    cfg = build_config("/src", "/mnt", ["cache_size=50%,allow_other,noatime,x-systemd.automount"])
    assert cfg.cache_size_percent == 50.0 and cfg.cache_size is None and cfg.allow_other


# ---- checkpoints --------------------------------------------------------------------------

def test_a_synthetic_checkpoint_loads_to_the_same_digest_in_any_order(tmp_path):
    kib = 1024
    shards = checkpoint.write_checkpoint(tmp_path / "a", 512 * kib, shards=2, seed=1,
                                         min_tensor=16 * kib, max_tensor=64 * kib)
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert checkpoint.shard_paths(tmp_path / "a") == shards
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    digest = checkpoint.load_digest(tmp_path / "a")
    assert checkpoint.load_digest(tmp_path / "a", order_seed=7) == digest
    checkpoint.write_checkpoint(tmp_path / "b", 512 * kib, shards=2, seed=1, min_tensor=16 * kib, max_tensor=64 * kib)
    assert checkpoint.load_digest(tmp_path / "b") == digest  # seeded: the same bytes every run
    with open(shards[1], "r+b") as f:  # one flipped byte of tensor data changes the digest
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert checkpoint.load_digest(tmp_path / "a") != digest
