"""A hostile local user against a root `allow_other` mount: every name, file type, size and
race in the source and the cache dir is theirs to choose. Each test is an attack an audit
reproduced; docs/reliability.md lists them with what the user now sees."""

from __future__ import annotations

import errno
import os
import random
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Mount, file_bytes, mount_in, run_cli
from .helpers import NOBODY, as_user, encode, entries, fill

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def daemon_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- privilege and data leaks ------------------------------------------------------------

def test_directory_swapped_for_a_symlink_leads_nowhere(world):
    base, _ = world
    src, secret = base / "src", base / "secret"
    (src / "pub").mkdir(parents=True)
    (src / "pub").chmod(0o777)
    secret.mkdir()
    (secret / "visible.txt").write_text("root's secret")
    secret.chmod(0o700)
    m = mount_in(world, src)
    out = as_user(f"""
        import os
        os.mkdir("{src}/pub/d")
        os.chdir("{m.mountpoint}/pub/d")
        os.rename("{src}/pub/d", "{src}/pub/d.old")
        os.symlink("{secret}", "{src}/pub/d")
        try:
            print(open("visible.txt").read())
        except OSError as e:
            print("refused", e.errno)
    """)
    assert "secret" not in out and out.startswith("refused"), out
    # root asking to prefetch through a symlinked directory caches nothing from outside
    os.symlink(secret, src / "dirlink")
    result = run_cli("prefetch", m.mountpoint / "dirlink" / "visible.txt", check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result
    assert not list(m.cache_dir.rglob("*.idx"))


def test_posix_acls_of_the_source_are_enforced(world):
    base, _ = world
    src = base / "src"
    (src / "denied-dir").mkdir(parents=True)
    for path in (src / "f", src / "denied-dir" / "g"):
        path.write_text("data")
        path.chmod(0o644)
    try:
        os.setxattr(src / "f", "system.posix_acl_access", encode(entries(f"u::rw-,u:{NOBODY}:---,g::r--,m::r--,o::r--")))
        os.setxattr(src / "denied-dir", "system.posix_acl_access",
                    encode(entries(f"u::rwx,u:{NOBODY}:---,g::r-x,m::r-x,o::r-x")))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on {src}: {e}")
    m = mount_in(world, src)
    assert (m.mountpoint / "denied-dir" / "g").read_text() == "data"  # root's lookups are cached now
    probe = """
        import os
        for path in ("{mnt}/f", "{mnt}/denied-dir/g", "{mnt}/denied-dir"):
            try:
                os.listdir(path) if path.endswith("dir") else open(path).read()
                print(path, "ok")
            except OSError as e:
                print(path, e.errno)
    """.format(mnt=m.mountpoint)
    assert as_user(probe).split() == [f"{m.mountpoint}/f", str(errno.EACCES), f"{m.mountpoint}/denied-dir/g",
                                      str(errno.EACCES), f"{m.mountpoint}/denied-dir", str(errno.EACCES)]
    # another user, not named in the ACLs, reads as the mode bits allow
    assert as_user(probe, uid=NOBODY - 1).split()[1::2] == ["ok", "ok", "ok"]


def test_a_cache_dir_others_control_is_refused(world):
    base, _ = world
    src = base / "src"
    fill(src, {"f": 1000})
    cases = {}
    owned = base / "owned-by-nobody"
    owned.mkdir()
    os.chown(owned, NOBODY, NOBODY)
    cases[owned] = "owned by uid 65534"
    open_dir = base / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: others could rename the store away and put theirs there
    cases[open_dir] = "writable by group or others"
    planted = base / "planted"
    (planted / "fusecache-v1").mkdir(parents=True)
    planted.chmod(0o700)
    os.chown(planted / "fusecache-v1", NOBODY, NOBODY)
    cases[planted] = "owned by uid 65534"
    for n, (cache_dir, message) in enumerate(cases.items()):
        mountpoint = base / f"refused{n}"
        mountpoint.mkdir()
        world[1].append(Mount(src, mountpoint, cache_dir, []))  # torn down if it mounts after all
        result = run_cli("mount", src, mountpoint, "--cache-dir", cache_dir, check=False)
        assert result.returncode == 1, result
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("fusecache: refusing to use") and message in line, line
        assert not os.path.ismount(mountpoint)


def test_nothing_in_the_store_is_followed_or_trusted_unless_ours(world):
    base, _ = world
    src = base / "src"
    data = fill(src, {"f": 3 * MiB})["f"]
    m = mount_in(world, src)
    assert file_bytes(m.mountpoint / "f") == data
    m.unmount()
    [store] = (m.cache_dir / "fusecache-v1").iterdir()
    victim = base / "victim"
    victim.write_text("untouched")
    (store / "source").unlink()
    os.symlink(victim, store / "source")  # as if planted: root must not write through it
    [data_file] = store.rglob("*.data")
    planted = data_file.with_name("planted")
    planted.write_bytes(b"P" * 3 * MiB)
    os.chown(planted, NOBODY, NOBODY)
    os.replace(planted, data_file)  # a cache file fusecache did not make
    m.mount()
    assert victim.read_text() == "untouched"
    assert not (store / "source").is_symlink()
    assert file_bytes(m.mountpoint / "f") == data


def test_logs_pins_and_store_are_private(world):
    base, _ = world
    src = base / "src"
    fill(src, {"secret-name.bin": 1000})
    m = mount_in(world, src)
    run_cli("pin", m.mountpoint / "secret-name.bin")
    [store] = (m.cache_dir / "fusecache-v1").iterdir()
    for path in (store / "daemon.log", store / "pins.json", store / "lock", store / "source"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (m.cache_dir, m.cache_dir / "fusecache-v1", store, store / "objects"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    # a log left world-readable by an older version is closed up at the next mount
    m.unmount()
    (store / "daemon.log").chmod(0o644)
    m.mount()
    assert stat.S_IMODE((store / "daemon.log").stat().st_mode) == 0o600


# ---- denial of service by an ordinary user ------------------------------------------------

def test_fifos_and_devices_posing_as_checkpoint_indexes_hang_nothing(world):
    base, _ = world
    src = base / "src"
    for i in range(20):
        d = src / f"m{i}"
        fill(d, {"model-00001-of-00002.safetensors": 1000, "model-00002-of-00002.safetensors": 1000})
        os.mkfifo(d / "model.safetensors.index.json")
    (src / "zero").mkdir()
    fill(src / "zero", {"model-00001-of-00001.safetensors": 1000})
    os.symlink("/dev/zero", src / "zero" / "model.safetensors.index.json")
    (src / "huge").mkdir()
    fill(src / "huge", {"model-00001-of-00001.safetensors": 1000})
    with open(src / "huge" / "model.safetensors.index.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: costs nothing on disk, a GiB in memory if read whole
    m = mount_in(world, src, ["readahead=shards"])
    shards = [m.mountpoint / f"m{i}" / "model-00001-of-00002.safetensors" for i in range(20)]
    shards += [m.mountpoint / d / "model-00001-of-00001.safetensors" for d in ("zero", "huge")]
    # each first open lists its directory and reads its index; in a child with a time limit,
    # so that a hang fails the test instead of hanging it
    out = as_user(f"""
        import os, time
        shards = {[str(s) for s in shards]!r}
        for shard in shards:
            with open(shard, "rb") as f:
                f.read(1)
        time.sleep(1)
        print(len(os.listdir("{m.mountpoint}")), sum(len(open(s, "rb").read()) for s in shards))
    """, uid=0, timeout=20)
    assert out.split() == ["22", str(22 * 1000)]
    assert daemon_rss(m.pid) < 300 * MiB
    subprocess.run([sys.executable, "-m", "fusecache", "umount", m.mountpoint], timeout=30, check=True)
    m.pid = None


def test_many_opens_of_a_huge_directory_cost_no_memory(world):
    base, _ = world
    src = base / "src"
    big = src / "big"
    big.mkdir(parents=True)
    names = {f"entry-with-a-longish-name-{i:06d}" for i in range(20000)}
    for name in names:
        (big / name).touch()
    m = mount_in(world, src)
    assert set(os.listdir(m.mountpoint / "big")) == names  # read in many batches, resumed by offset
    before = daemon_rss(m.pid)
    fds = []
    try:
        for _ in range(25):  # a listing kept per handle would be some 15 MiB each: 375 MiB
            fd = os.open(m.mountpoint / "big", os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            with os.scandir(fd) as it:
                next(it)  # opendir and a first readdir on each
        grown = daemon_rss(m.pid) - before
    finally:
        for fd in fds:
            os.close(fd)
    print(f"daemon RSS grew {grown / MiB:.1f} MiB for 25 open handles of a 20,000-entry directory")
    assert grown < 64 * MiB


def test_descriptors_running_out_fail_only_the_open_that_needs_one(world):
    base, _ = world
    src = base / "src"
    contents = fill(src, {f"f{i:03d}": 100 + i for i in range(300)})
    mountpoint = base / "mnt-limited"
    mountpoint.mkdir()
    m = Mount(src, mountpoint, base / "cache", ["allow_other", "readahead=off"])
    world[1].append(m)
    subprocess.run([sys.executable, "-m", "fusecache", "mount", src, mountpoint, "--cache-dir", m.cache_dir,
                    "-o", "allow_other,readahead=off"], check=True, timeout=60,
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512)))
    m.pid = m.status()["pid"]
    limits = Path(f"/proc/{m.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [["512", "512"]]
    held, refused = [], 0
    try:
        for name in contents:
            try:
                held.append(open(mountpoint / name, "rb"))
            except OSError as e:
                assert e.errno == errno.EMFILE, e
                refused += 1
        assert held and refused, (len(held), refused)
        # everything else still works meanwhile
        assert len(os.listdir(mountpoint)) == 300
        assert os.stat(mountpoint / "f299").st_size == 399
        assert held[0].read() == contents["f000"]
    finally:
        for f in held:
            f.close()
    for name, data in contents.items():  # idle files give their descriptors back
        assert file_bytes(mountpoint / name) == data
    print(f"{len(held)} files held open at once under a limit of 512 descriptors, {refused} opens refused")


# ---- wrong bytes -------------------------------------------------------------------------

def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.mark.parametrize("read_before", ["whole", "part"])
def test_same_size_same_mtime_rewrite_in_place_is_never_served_stale(world, read_before):
    base, _ = world
    src = base / "src"
    v1 = fill(src, {"f.bin": 8 * MiB}, seed=80)["f.bin"]
    v2 = random.Random(81).randbytes(8 * MiB)
    m = mount_in(world, src, ["readahead=off", "chunk_size=1M", "attr_timeout=0.2"])
    with open(m.mountpoint / "f.bin", "rb") as a:
        seen = a.read() if read_before == "whole" else a.read(3 * MiB)
        assert seen == v1[:len(seen)]
        st = os.stat(src / "f.bin")
        with open(src / "f.bin", "r+b") as f:  # in place: same inode, same size
            f.write(v2)
        os.utime(src / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
        assert os.stat(src / "f.bin").st_mtime_ns == st.st_mtime_ns
        assert file_bytes(m.mountpoint / "f.bin") == v2  # a new open sees the new version
        drop_page_cache()
        a.seek(0)
        # the old handle never mixes in bytes from the other version: where it had cached its
        # own it reads them, and the rest fails (only the ctime moved: that is all it knows)
        assert a.read(len(seen)) == v1[:len(seen)]
        if read_before == "part":
            with pytest.raises(OSError) as info:
                a.read()
            assert info.value.errno == errno.EIO
    deadline = time.monotonic() + 1  # several attr_timeouts: what the kernel caches expires meanwhile
    while time.monotonic() < deadline:
        assert file_bytes(m.mountpoint / "f.bin") == v2
        time.sleep(0.1)
    m.unmount()
    m.mount()
    assert file_bytes(m.mountpoint / "f.bin") == v2


@pytest.mark.parametrize("inodes, refetched", [("auto", False), ("stable", True)])
def test_a_source_that_renumbers_its_inodes_keeps_its_cache(counting_source, make_mount, inodes, refetched):
    """countingfs numbers files in the order they are looked up, as sshfs without use_ino
    does: after a restart, the same files have other numbers."""
    contents = fill(counting_source.real, {"a.bin": 2 * MiB, "b.bin": 3 * MiB})
    counting_source.start()
    first = {name: os.stat(counting_source.path / name).st_ino for name in contents}
    m = make_mount(counting_source.path, ["readahead=off", f"source_inodes={inodes}"])
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    m.unmount()
    counting_source.stop()
    (counting_source.state / "counts.json").unlink()
    counting_source.start()
    second = {name: os.stat(counting_source.path / name).st_ino for name in reversed(contents)}
    assert first != second
    m.mount()
    for name, data in contents.items():
        assert file_bytes(m.mountpoint / name) == data
    assert (counting_source.total() > 0) == refetched


@pytest.mark.parametrize("swapped", ["parent", "mountpoint"])
def test_a_mountpoint_made_a_symlink_after_its_check_is_not_mounted_over(tmp_path, swapped):
    """The owner of a directory on the way to root's mountpoint turns it into a symlink
    between the check and the mount (the store loads for seconds in between): the mount is
    refused, never made where the link leads (root's mount of the source over /etc)."""
    from fusecache import mounts
    from fusecache.session.mount import MountSpec, mount

    bob = tmp_path / "bob"
    (bob / "mnt").mkdir(parents=True)
    checked = os.path.realpath(bob / "mnt")
    elsewhere = tmp_path / "etc"
    (elsewhere / "mnt").mkdir(parents=True)
    if swapped == "parent":
        bob.rename(tmp_path / "bob.old")
        bob.symlink_to(elsewhere)
    else:
        (bob / "mnt").rmdir()
        (bob / "mnt").symlink_to(elsewhere / "mnt")
    try:
        with pytest.raises(OSError):
            os.close(mount(MountSpec(checked, "hostile-test")))
        assert mounts.find_mount(str(elsewhere / "mnt")) is None
    finally:  # without the check, the mount was made there
        if mounts.find_mount(str(elsewhere / "mnt")) is not None:
            mounts.unmount(str(elsewhere / "mnt"), lazy=True)
