"""The command line: every bad input is one line on stderr, a non-zero exit, nothing mounted
and nothing left running; the mount.fuse3 form and mount(8) work."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fusecache import config, control, mounts, supervisor
from fusecache.cli import printable
from fusecache.config import GiB, MountConfig, memory_limit

from .conftest import DEFAULT_OPTIONS, SESSION, is_mounted, run_cli, wait_gone

MiB = 1 << 20


def daemons(mentioning: Path | None = None) -> set[int]:
    """pids of running fusecache daemons (those with `mentioning` in their command line)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg == b"fusecache" for arg in cmdline) and b"mount" in cmdline and (
                mentioning is None or any(os.fsencode(mentioning) in arg for arg in cmdline)):
            found.add(int(pid))
    return found


@contextmanager
def no_leftovers(tmp_path: Path, mountpoint: Path) -> Iterator[None]:
    """Where a regression mounts after all, fail without leaving the mount and its daemon (some
    deadlock on their own mount) behind. Nothing here touches the mountpoint itself."""
    try:
        yield
    finally:
        path = mounts.resolve_mountpoint(str(mountpoint))
        if mounts.find_mount(path) is not None:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
        for pid in daemons(mentioning=tmp_path):
            os.kill(pid, signal.SIGKILL)


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
    assert daemons(mountpoint) <= before  # others' daemons may come and go meanwhile


# Refused before any session is made: run once, in the kernel tier, not again under pyfuse3.
ONE_TIER = pytest.mark.skipif(SESSION == "pyfuse3", reason="refused before a session is made: the kernel tier runs it")


@pytest.mark.fuse
@ONE_TIER
@pytest.mark.parametrize("case, message, status", [
    ("missing-source", "does not exist", 1),
    ("source-is-file", "is not a directory", 1),
    ("source-name-too-long", "cannot be used: File name too long", 1),  # was a traceback (Path.exists)
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
    ("huge-size", "invalid cache_size '11111", 2),
])
def test_bad_mount_input(dirs, case, message, status):
    source, mountpoint, cache = dirs
    a_file = source.parent / "file"  # not in the source: paths inside it are refused for that
    a_file.write_text("")
    args = ["mount", source, mountpoint, "--cache-dir", cache]
    if case == "missing-source":
        args[1] = source / "nope"
    elif case == "source-is-file":
        args[1] = source / "f"
    elif case == "source-name-too-long":
        args[1] = source / ("x" * 300)
    elif case == "missing-mountpoint":
        args[2] = mountpoint / "nope"
    elif case == "mountpoint-is-file":
        args[2] = a_file
    elif case == "mountpoint-not-empty":
        (mountpoint / "x").write_text("")
    elif case == "cache-dir-unwritable":
        args[4] = a_file / "cache"
    else:
        option = {"unknown-option": "colour=blue", "malformed-size": "chunk_size=4 parsecs",
                  "bad-chunk-size": "chunk_size=3M", "flag-needs-value": "cache_dir",
                  "bad-number": "streams=many", "empty-option": "allow_other,,ro",
                  "huge-size": "cache_size=" + "1" * 400}[case]
        args += ["-o", option]
    assert_refused(args, message, mountpoint, status)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.fuse
@ONE_TIER
@pytest.mark.parametrize("case, message", [
    ("mountpoint-is-source", "source and mountpoint must differ"),
    ("mountpoint-in-source", "must be outside the source"),
    ("mountpoint-in-source-by-symlink", "must be outside the source"),
    ("source-in-mountpoint", "must be outside the mountpoint"),
    ("cache-is-mountpoint", "must be outside the mountpoint"),
    ("cache-in-mountpoint", "must be outside the mountpoint"),
    ("cache-is-source", "must be outside the source"),
    ("cache-in-source", "must be outside the source"),
    ("cache-in-source-by-symlink", "must be outside the source"),
])
def test_overlapping_paths_are_refused(dirs, case, message):
    """A mountpoint inside the source deadlocked on its own requests; a cache dir inside the
    mountpoint never came up and left a dead mount; one inside the source showed the cache
    through the mount. Refused before anything is created."""
    source, mountpoint, cache = dirs
    (source / "sub").mkdir()
    (source.parent / "link").symlink_to(source)
    args = ["mount", source, mountpoint, "--cache-dir", cache]
    if case == "mountpoint-is-source":
        args[2] = source
    elif case == "mountpoint-in-source":
        args[2] = source / "sub"
    elif case == "mountpoint-in-source-by-symlink":
        args[2] = source.parent / "link" / "sub"
    elif case == "source-in-mountpoint":
        (mountpoint / "src").mkdir()
        args[1:3] = [mountpoint / "src", mountpoint]
    elif case == "cache-is-mountpoint":
        args[4] = mountpoint
    elif case == "cache-in-mountpoint":
        args[4] = mountpoint / "cache"
    elif case == "cache-is-source":
        args[4] = source
    elif case == "cache-in-source":
        args[4] = source / "sub" / "cache"
    elif case == "cache-in-source-by-symlink":
        args[4] = source.parent / "link" / "cache"  # does not exist yet: its parent resolves
    before = tree(source.parent)
    with no_leftovers(source.parent, Path(args[2])):
        assert_refused(args, message, Path(args[2]))
    assert tree(source.parent) == before


@pytest.mark.fuse
def test_paths_that_only_share_a_prefix_do_not_overlap(dirs):
    """Containment is by whole components: src2 and srcmnt are not inside src."""
    source, _mountpoint, _cache = dirs
    mountpoint, cache = source.parent / "srcmnt", source.parent / "src2"
    mountpoint.mkdir()
    try:
        run_cli("mount", source, mountpoint, "--cache-dir", cache)
        assert (mountpoint / "f").read_text() == "data"
    finally:
        run_cli("umount", mountpoint, check=False)
    assert not is_mounted(mountpoint)


def test_buffers_beyond_half_the_memory_are_refused(dirs):
    options = "streams=64,stream_read_size=1G,chunk_size=256M,fetch_threads=256,workers=1024"
    cfg = MountConfig(Path("/s"), Path("/m"), streams=64, stream_read_size=GiB, chunk_size=GiB // 4,
                      fetch_threads=256, workers=1024)
    if cfg.buffer_bytes() <= memory_limit() // 2:
        pytest.skip("this machine has the memory for the largest settings")
    source, mountpoint, cache = dirs
    assert_refused(["mount", source, mountpoint, "--cache-dir", cache, "-o", options],
                   f"the daemon's buffers would take {cfg.buffer_bytes() / GiB:.1f} GiB, more than half of the memory",
                   mountpoint, 2)


@pytest.mark.fuse
def test_metrics_address_in_use_is_refused(dirs):
    """The exporter is bound before mounting: a port in use used to exit 0 with the error
    only in daemon.log."""
    source, mountpoint, cache = dirs
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with no_leftovers(source.parent, mountpoint):
            assert_refused(["mount", source, mountpoint, "--cache-dir", cache, "-o", f"metrics_addr=127.0.0.1:{port}"],
                           f"cannot serve metrics on 127.0.0.1:{port}: Address already in use", mountpoint)


@pytest.mark.fuse
def test_an_unusable_metrics_textfile_is_refused(dirs, tmp_path):
    """A textfile in a missing directory used to mount and log a warning every 5 s; one in a
    directory others can write let them steer the root daemon's writes (audit 2, items 1, 17)."""
    source, mountpoint, cache = dirs
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for textfile, reason in ((tmp_path / "nowhere" / "f.prom", f"directory {tmp_path / 'nowhere'} does not exist"),
                             (shared / "f.prom", f"{shared} is writable by group or others")):
        with no_leftovers(source.parent, mountpoint):
            assert_refused(["mount", source, mountpoint, "--cache-dir", cache, "-o", f"metrics_textfile={textfile}"],
                           reason, mountpoint)


@pytest.mark.fuse
@pytest.mark.skipif(SESSION != "kernel", reason="the CLI's timeouts: the same whichever session the daemon runs")
def test_status_and_umount_of_a_stopped_daemon(dirs, make_mount):
    """status and umount used to hang forever: resolving the mountpoint is a request to the
    stopped daemon. status now gives up after 10 s of silence; umount unmounts anyway. The
    mountpoint is found from its parent's real path (here through a symlink), never its own."""
    source, _mountpoint, _cache = dirs
    m = make_mount(source)
    alias = m.mountpoint.parent / "alias"
    alias.symlink_to(".")  # alias/mnt0 is mnt0
    pid = m.pid
    os.kill(pid, signal.SIGSTOP)
    from fusecache import cli
    assert cli.STATUS_TIMEOUT == 10  # run below at 1 s: the wait itself is not what is tested

    def run_briefly(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from fusecache import cli; cli.STATUS_TIMEOUT = 1; "
                               "sys.exit(cli.main(sys.argv[1:]))", *map(str, args)],
                              capture_output=True, text=True, timeout=40)

    try:
        with ThreadPoolExecutor(2) as both:
            asked = both.submit(run_briefly, "status", alias / m.mountpoint.name)
            unmounted = both.submit(run_briefly, "umount", m.mountpoint)
            status, umount = asked.result(), unmounted.result()
        assert status.returncode == 1, status
        assert status.stderr.splitlines() == [f"fusecache: the daemon of {m.mountpoint} did not answer within 1s"]
        assert umount.returncode == 0, umount
        assert umount.stderr.splitlines() == [f"fusecache: the daemon of {m.mountpoint} did not answer within 1s; "
                                              "unmounted without waiting for it to exit"]
        assert mounts.find_mount(str(m.mountpoint)) is None  # by mountinfo: nothing touches the mountpoint
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_gone(pid)  # continued, it finds its mount gone and exits
    m.pid = None


def test_printable_escapes_what_a_terminal_acts_on():
    assert printable("model-00001.safetensors ü 模型") == "model-00001.safetensors ü 模型"
    assert printable("a\x1b]0;pwned\x07\n\t\x7f") == r"a\x1b]0;pwned\x07\x0a\x09\x7f"
    assert printable("\x9b31m\u202egpj.exe\u2028") == r"\u009b31m\u202egpj.exe\u2028"
    assert printable("back\\slash \udcff\ud800 \U000e0001") == r"back\\slash \xff\ud800 \U000e0001"


@pytest.mark.fuse
def test_file_names_are_printed_escaped(dirs, make_mount):
    """status and cache ls printed source file names raw: escape sequences reached the
    terminal, and a name that is not UTF-8 was a UnicodeEncodeError."""
    source, _mountpoint, _cache = dirs
    names = ["\x1b[31mred", "two\nlines", "back\\slash", os.fsdecode(b"latin1-\xe9")]
    for name in names:
        (source / name).write_bytes(b"x" * 100)
    m = make_mount(source)
    for name in names:
        assert (m.mountpoint / name).read_bytes() == b"x" * 100
    escaped = [r"\x1b[31mred", r"two\x0alines", r"back\\slash", r"latin1-\xe9"]
    for args in (["status", m.mountpoint], ["cache", "ls", m.mountpoint]):
        out = run_cli(*args).stdout
        assert "\x1b" not in out and "two\n" not in out, out
        for name in escaped:
            assert sum(line.endswith(name) or f" {name} " in line for line in out.splitlines()) == 1, (name, out)
    listed = {f["path"] for f in json.loads(run_cli("cache", "ls", m.mountpoint, "--json").stdout)["files"]}
    assert set(names) <= listed  # --json keeps the names as they are
    alias = m.mountpoint.parent / "alias"  # the mount reached through a symlink (/fast -> /nvme)
    alias.symlink_to(m.mountpoint.parent)
    via_alias = json.loads(run_cli("cache", "ls", alias / m.mountpoint.name, "--json").stdout)["files"]
    assert {f["path"] for f in via_alias} == listed  # was "not inside a fusecache mount"


@pytest.mark.fuse
def test_output_to_a_reader_that_left(dirs, make_mount):
    """`fusecache cache ls MNT | head -1` ended in a BrokenPipeError traceback."""
    source, _mountpoint, _cache = dirs
    m = make_mount(source)
    assert (m.mountpoint / "f").read_text() == "data"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before anything is written
    try:
        result = subprocess.run([sys.executable, "-m", "fusecache", "cache", "ls", str(m.mountpoint)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == ""


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
def test_mount_over_a_stopped_daemon_says_already_mounted(dirs, make_mount):
    """The stale-mount check asked the mountpoint (statfs), a request to its daemon: over a
    stopped or hung one, `fusecache mount` blocked instead of refusing. The timeout below is
    far beyond the answer's milliseconds; hitting it is the failure."""
    source, _mountpoint, cache = dirs
    m = make_mount(source)
    os.kill(m.pid, signal.SIGSTOP)
    try:
        result = run_cli("mount", source, m.mountpoint, "--cache-dir", cache.parent / "cache2", check=False, timeout=60)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"fusecache: mountpoint {m.mountpoint} is already mounted"]
    assert (m.mountpoint / "f").read_text() == "data"


@pytest.mark.fuse
@pytest.mark.parametrize("daemon", ["serving", "stopped"])
def test_a_live_mount_whose_control_socket_is_gone_is_not_unmounted_as_stale(dirs, make_mount, daemon):
    """A mount whose control socket went away (logind removes /run/user/UID at logout,
    tmpfiles ages /tmp) was taken for a crashed daemon's: `fusecache mount` at its path
    unmounted the live mount. Only a connection the kernel says ended (ENOTCONN) is stale
    now; a stopped daemon, which answers nothing, is alive. (Found by review.)"""
    source, _mountpoint, cache = dirs
    m = make_mount(source)
    control_socket = control.socket_path(mounts.resolve_mountpoint(str(m.mountpoint)), os.getuid())
    sockets = [path for path in (control_socket, supervisor.socket_for(control_socket)) if path.exists()]
    assert control_socket in sockets  # and the supervisor's, where the session has one
    for path in sockets:
        path.rename(path.with_name(path.name + ".moved"))
    if daemon == "stopped":
        os.kill(m.pid, signal.SIGSTOP)
    try:
        result = run_cli("mount", source, m.mountpoint, "--cache-dir", cache.parent / "cache2", check=False, timeout=60)
    finally:
        if daemon == "stopped":
            os.kill(m.pid, signal.SIGCONT)
        for path in sockets:
            path.with_name(path.name + ".moved").rename(path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"fusecache: mountpoint {m.mountpoint} is already mounted"]
    assert (m.mountpoint / "f").read_text() == "data"


@pytest.mark.fuse
def test_a_mountpoint_being_mounted_is_refused_and_let_go_once_mounted(dirs, make_mount):
    """Two `fusecache mount`s of one path at once both passed the mount-table check and
    stacked two mounts, whose daemons took each other's control socket. The mountpoint is
    locked while it is mounted (its directory; here the test holds that lock), and let go
    once the mount is up: by the command and by the daemons it forked. (Found by review.)"""
    source, mountpoint, cache = dirs
    lock = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert_refused(["mount", source, mountpoint, "--cache-dir", cache],
                       f"mountpoint {mountpoint} is already mounted, or being mounted, by fusecache", mountpoint)
    finally:
        os.close(lock)
    m = make_mount(source, mount=False)
    beneath = os.stat(m.mountpoint).st_ino  # the directory the lock is on, hidden by the mount
    m.mount()
    held = [line.split()[5] for line in Path("/proc/locks").read_text().splitlines() if "FLOCK" in line]
    assert not any(lock.endswith(f":{beneath}") for lock in held), held  # kept by none of its processes
    assert (m.mountpoint / "f").read_text() == "data"


@pytest.mark.fuse
def test_prefetch_of_more_paths_than_a_request_holds(dirs, make_mount):
    """`fusecache prefetch DIR` asked for progress by listing every file: past the 1 MiB
    request limit it failed ("cannot talk to the daemon: Broken pipe", exit 1) while the daemon
    went on fetching. Long names make 1300 files list well over 1 MiB."""
    source, _mountpoint, _cache = dirs
    deep = source / "many" / ("d" * 250) / ("e" * 250) / ("f" * 250)
    deep.mkdir(parents=True)
    names = [f"{i:04d}".ljust(250, "x") for i in range(1300)]
    for name in names:
        (deep / name).write_bytes(name[:4].encode())
    listed = sum(len(str((deep / name).relative_to(source))) + 4 for name in names)
    assert listed > control.MAX_REQUEST
    m = make_mount(source, ["readahead=off"])
    result = run_cli("prefetch", m.mountpoint / "many", "--json", check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report[0]["files"] == 1300 and report[0]["cached"] == report[0]["bytes"] == 4 * 1300
    assert (m.mountpoint / deep.relative_to(source) / names[-1]).read_bytes() == b"1299"


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
def test_an_old_option_spelling_mounts_with_one_warning_line(dirs):
    source, mountpoint, cache = dirs
    try:
        result = run_cli("mount", source, mountpoint, "--cache-dir", cache, "-o", "block_size=8M")
        assert result.stderr.strip().splitlines() == [
            "fusecache: warning: option 'block_size' is deprecated: use 'stream_read_size'"]
        assert (mountpoint / "f").read_text() == "data"
    finally:
        run_cli("umount", mountpoint, check=False)


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


def test_status_prints_an_older_or_hostile_daemons_report_safely(capsys, monkeypatch):
    """`fusecache status` asks every mount's daemon, some perhaps run by other users, some
    older (running until restarted after an upgrade): a figure an older one lacks counts 0,
    and nothing a daemon says reaches the terminal unescaped. It raised KeyError for the
    older, and printed the other's escape sequences."""
    from fusecache import cli

    older = {"mountpoint": "/m", "source": "/s", "pid": 7, "cache": "/c", "passthrough": "on", "pending_bytes": 0,
             "files": [], "metrics": {"hit_ratio": None, "bytes_from_source": 1, "source_rate": 0, "bytes_served": 2,
                                      "bytes_served_from_cache": 2, "fetch_errors": 0, "checksum_failures": 0}}
    cli._print_status(older)
    assert "from source:  1 B" in capsys.readouterr().out
    hostile = dict(older, passthrough="\x1b]0;owned\x07", metrics=dict(older["metrics"], fetch_errors="\x1b[2J"))
    reports = {"/a": hostile, "/b": dict(older, files=[{"path": "\x1b[31mf", "size": 1, "cached": 1}])}
    monkeypatch.setattr(cli, "fusecache_mounts", lambda: list(reports))  # the daemons' answers, as given
    monkeypatch.setattr(cli.control, "call", lambda mountpoint, request, timeout, total=None: reports[mountpoint])
    assert cli.cmd_status(argparse.Namespace(mountpoint=None, json=False)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "could not be read" in out and "\\x1b[31mf" in out

    def refusing(mountpoint, request, timeout, total=None):  # a daemon that does not answer, or is not ours to ask
        if mountpoint == "/a":
            raise control.ControlError("permission denied: cannot use the control socket of /a")
        return reports[mountpoint]

    monkeypatch.setattr(cli.control, "call", refusing)
    assert cli.cmd_status(argparse.Namespace(mountpoint=None, json=False)) == 1  # it stopped at the first
    captured = capsys.readouterr()
    assert "fusecache: /a: permission denied" in captured.err and "/m  <-  /s" in captured.out


@contextmanager
def a_daemon_answering(serve: Callable[[socket.socket], None], tmp_path: Path, monkeypatch) -> Iterator[None]:
    """A control socket that serve(listener) answers on a thread, taken by the CLI for the
    daemon of the mount /mnt (whose f is the path it is given)."""
    from fusecache import cli

    path = tmp_path / "daemon.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(4)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        monkeypatch.setattr(cli.control, "_endpoint", lambda mountpoint: (path, os.getuid()))
        monkeypatch.setattr(cli, "_locate", lambda p: ("/mnt", "f"))
        monkeypatch.setattr(cli, "fusecache_mounts", lambda: ["/mnt"])
        yield


def replying(reply: bytes, times: int) -> Callable[[socket.socket], None]:
    def serve(listener: socket.socket) -> None:
        for _ in range(times):
            conn, _ = listener.accept()
            with conn:
                conn.recv(1 << 16)
                conn.sendall(reply)
    return serve


@pytest.mark.parametrize("reply", [b"null\n", b'"error"\n', b"[1]\n", b'{"error": ["a", "list"]}\n',
                                   b'{"queued": 1}\n', b'{"files": "many"}\n'])
def test_a_daemons_reply_that_is_not_ours_is_one_line(tmp_path, monkeypatch, capsys, reply):
    """Whatever a socket answers (another release's daemon; on a shared node, anyone's), a
    command says so in one line: it died with a traceback on `null`, a string, a list, or a
    reply without the fields it reads. (Found by review.)"""
    from fusecache import cli

    with a_daemon_answering(replying(reply, 2), tmp_path, monkeypatch):
        for argv in (["prefetch", "/mnt/f", "--no-wait"], ["cache", "ls", "/mnt"]):
            status = cli.main(argv)
            err = capsys.readouterr().err
            assert status == 1 and err.count("\n") == 1 and err.startswith("fusecache: "), (argv, err)


DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE = b"1" + b"0" * 400  # a JSON integer: parsed exactly, too large for a float


@pytest.mark.parametrize("argv, reply", [
    (["cache", "ls", "/mnt"], DEEP + b"\n"),  # RecursionError in json.loads
    (["status", "/mnt"], json.dumps({  # int(inf): OverflowError
        "mountpoint": "/mnt", "source": "/s", "pid": float("inf"), "cache": "/c", "files": [],
        "metrics": {"hit_ratio": None}}).encode() + b"\n"),
    (["cache", "ls", "/mnt"], b'{"cache_bytes": ' + HUGE + b', "cache_limit": 1, "files": []}\n'),  # human()
    (["cache", "ls", "/mnt"], b'{"cache_bytes": 1, "cache_limit": 1, "files": [{"cached": 1, "size": 1, '
                              b'"last_used": 1e20, "pinned": false, "path": "f"}]}\n'),  # time.localtime
], ids=["deep", "inf-pid", "huge-int", "huge-time"])
def test_a_daemons_odd_numbers_or_nesting_are_one_line(tmp_path, monkeypatch, capsys, argv, reply):
    """Another user's daemon (root runs `fusecache status` / `cache ls` on every node's mounts)
    answered valid JSON the CLI could not handle: a traceback instead of one line and exit 1.
    (Found by review.)"""
    from fusecache import cli

    with a_daemon_answering(replying(reply, 1), tmp_path, monkeypatch):
        status = cli.main(argv)
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1 and err.startswith("fusecache: "), err


def test_cache_ls_gives_up_on_a_daemon_that_only_sends_heartbeats(tmp_path, monkeypatch):
    """`cache ls` is answered from memory, as `status` is, but was asked with no `total`: a
    daemon that sends heartbeats and nothing else (another user's, for root's `cache ls`)
    kept it waiting forever. (Found by review.)"""
    from fusecache import cli

    stop = threading.Event()

    def heartbeats(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.wait(0.05):
                conn.sendall(b" ")

    with a_daemon_answering(heartbeats, tmp_path, monkeypatch):
        monkeypatch.setattr(cli, "STATUS_TIMEOUT", 1.0)
        result: list[int] = []
        client = threading.Thread(target=lambda: result.append(cli.main(["cache", "ls", "/mnt"])), daemon=True)
        client.start()
        client.join(10)
        in_time = list(result)
        stop.set()  # lets a hung client end
        client.join(5)
        assert in_time == [1], "cache ls still waits after 10 s of heartbeats"


def test_a_daemon_that_only_sends_heartbeats_is_given_up_on(tmp_path):
    """A status is answered from memory: heartbeats keep a busy daemon's long request alive,
    but a daemon that sends nothing else kept `status` waiting forever. (Found by review.)"""
    path = tmp_path / "daemon.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        stop = threading.Event()

        def heartbeats() -> None:
            conn, _ = listener.accept()
            with conn:
                while not stop.wait(0.05):
                    conn.sendall(b" ")

        threading.Thread(target=heartbeats, daemon=True).start()
        try:
            with pytest.raises(control.ControlTimeout):
                control.send_request(path, {"command": "status"}, 1.0, "/mnt", total=0.5)
        finally:
            stop.set()


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
    text = run_cli("status", m.mountpoint).stdout
    assert "w.safetensors" in text and "100.0%" in text
    assert f"{config.human(report['metrics']['bytes_served_direct'])} by its readers" in text, text


def test_restart_of_another_users_mount_is_refused_before_its_daemon_is_asked(capsys, monkeypatch):
    """Root's `fusecache restart` of a mount another user made took that user's daemon's word
    for the source and cache and served them, as root, on the user's connection: a daemon of
    their own could name /root. Only the mount's owner restarts it now; its daemon is never
    asked. (Found by review.)"""
    from fusecache import cli

    theirs = mounts.MountInfo(0, 99, "/home/u/mnt", cli.FSTYPE, "/home/u/src",
                              f"rw,user_id={os.getuid() + 1000},group_id=1000")
    monkeypatch.setattr(cli.mounts, "resolve_mountpoint", lambda path: path)
    monkeypatch.setattr(cli.mounts, "find_mount", lambda path: theirs)

    def asked(*args, **kwargs):
        raise AssertionError("the other user's daemon was asked")

    monkeypatch.setattr(cli.control, "call", asked)
    assert cli.main(["restart", "/home/u/mnt"]) == 1
    assert f"uid {os.getuid() + 1000}'s mount: only its owner restarts it" in capsys.readouterr().err


def test_an_exec_into_an_interpreter_that_is_gone_is_one_line(monkeypatch):
    """A restart in place execs the interpreter it was started with; after an upgrade that
    removed it, the exec failed with a traceback. Now one line and a failed exit (systemd
    then starts the service again, from its fd store). (Found by review.)"""
    from fusecache import cli

    monkeypatch.setattr(cli.sys, "executable", "/nonexistent/python3")
    with pytest.raises(cli.Failure, match="cannot run /nonexistent/python3: No such file or directory"):
        cli._run_again(["status"], {})


def test_a_recovery_the_installed_fusecache_cannot_run_goes_on_in_the_supervisors_child(tmp_path, monkeypatch,
                                                                                         caplog):
    """The supervisor's child execs the fusecache installed now to recover a mount; where that
    interpreter is gone, the child goes on with the modules it has (a daemon is better than an
    ended mount), and the connection's descriptor is not left to children it starts."""
    from fusecache import cli

    cfg = config.build_config(str(tmp_path / "src"), str(tmp_path / "mnt"), ["session=kernel"],
                              cache_dir=tmp_path / "cache")
    monkeypatch.setattr(cli.sys, "executable", "/nonexistent/python3")
    read_end, write_end = os.pipe()
    try:
        with caplog.at_level("WARNING"):
            cli._exec_recovery(cfg, read_end)
        assert "recovering the mount with the fusecache it was mounted with" in caplog.text
        assert not os.get_inheritable(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_recover_fd_takes_only_a_live_fuse_connection(tmp_path, capsys):
    """--recover-fd is the supervisor's; given any other descriptor it is one line, exit 1."""
    from fusecache import cli

    read_end, write_end = os.pipe()
    try:
        assert cli.main(["mount", str(tmp_path), str(tmp_path / "mnt"), "--recover-fd", str(read_end)]) == 1
    finally:
        os.close(read_end)
        os.close(write_end)
    err = capsys.readouterr().err
    assert err == f"fusecache: --recover-fd {read_end}: not a live FUSE connection (the option is fusecache's own)\n"


def test_an_empty_cache_dir_is_a_usage_error(tmp_path, capsys):
    """`--cache-dir ''` put the cache in the directory the command ran in. (Found by review.)"""
    from fusecache import cli

    assert cli.main(["mount", str(tmp_path), str(tmp_path / "mnt"), "--cache-dir", ""]) == 2
    assert capsys.readouterr().err == "fusecache: argument --cache-dir: empty path\n"


@pytest.mark.fuse
def test_umount_unmounts_only_the_mount_it_checked(tmp_path, monkeypatch):
    """Root's `fusecache umount /home/u/dir/mnt` checks that a fusecache mount is there, asks
    its daemon (the user's) for its pid, then unmounts the path again by name: umount2's
    UMOUNT_NOFOLLOW covers the last component only. While answering, the user's daemon swaps
    /home/u/dir for a symlink to /srv, and root unmounted /srv/mnt, any mount of root's. The
    checked directory is held (mounts.pinned) and the unmount goes through it. (Found by
    review.)"""
    from fusecache import cli

    source, cache, srv, user = (tmp_path / name for name in ("src", "cache", "srv", "u"))
    for d in (source, srv / "mnt", user / "dir" / "mnt"):
        d.mkdir(parents=True)
    (source / "f").write_bytes(b"x")
    theirs = user / "dir" / "mnt"
    subprocess.run(["mount", "-t", "tmpfs", "roots", str(srv / "mnt")], check=True)  # root's mount
    run_cli("mount", source, theirs, "--cache-dir", cache, *(a for o in DEFAULT_OPTIONS for a in ("-o", o)))
    daemon = cli.control.call(str(theirs), {"command": "pid"})
    try:
        real_call = cli.control.call

        def hostile_daemon(mountpoint, request, *args, **kwargs):
            answer = real_call(mountpoint, request, *args, **kwargs)
            os.rename(user / "dir", user / "dir.old")  # its mount moves along
            os.symlink(srv, user / "dir")
            return answer

        monkeypatch.setattr(cli.control, "call", hostile_daemon)
        monkeypatch.setattr(cli, "UMOUNT_WAIT", 1.0)
        cli.main(["umount", str(theirs)])
        assert mounts.find_mount(str(srv / "mnt")) is not None, "root's own mount was unmounted"
        assert mounts.find_mount(str(user / "dir.old" / "mnt")) is None  # the mount checked is the one unmounted
    finally:
        for path in (srv / "mnt", user / "dir.old" / "mnt", user / "dir" / "mnt"):
            if mounts.find_mount(str(path)) is not None and not os.path.islink(os.path.dirname(path)):
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
        for pid in (daemon["pid"], daemon["supervisor_pid"]):
            if pid:
                mounts.wait_for_exit(pid, 15) or os.kill(pid, 9)


@pytest.mark.fuse
def test_a_runtime_dir_others_can_write_is_a_clear_error(tmp_path):
    """The supervisor child checked the runtime dir (private.ensure_tree) and bound its socket
    outside any try that reports to the mounting command: UntrustedPath unwound the forked
    child through cli.main (a traceback in daemon.log) and the user read only "the daemon
    exited during start-up; see daemon.log", not the documented "refusing to use X: ...".
    (Found by review.)"""
    source, mountpoint, cache, run = (tmp_path / n for n in ("src", "mnt", "cache", "run"))
    for d in (source, mountpoint, run):
        d.mkdir()
    run.chmod(0o777)  # made by anyone first (/tmp/fusecache-<uid>)
    script = f"""
import os, sys
from pathlib import Path
from fusecache import cli, control
control.runtime_dirs = lambda uid: [Path({str(run)!r})]
sys.exit(cli.main(["mount", {str(source)!r}, {str(mountpoint)!r}, "--cache-dir", {str(cache)!r},
                   "-o", "session=kernel", "-o", "passthrough=off"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 1 and "writable by group or others" in result.stderr, result.stderr


def test_umount_without_fusermount3_says_so_not_not_a_mount(tmp_path, monkeypatch, capsys):
    """A user's umount where fusermount3 is missing (ENOENT from the tool's lookup) was told
    the live mount "is not a fusecache mount": that answer is for a mountpoint whose directory
    is gone. (Found by review of the day's diff.)"""
    from fusecache import cli

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    info = mounts.MountInfo(0, 99, str(mnt), cli.FSTYPE, "fusecache", f"rw,user_id={os.getuid()},group_id=0")
    monkeypatch.setattr(mounts, "find_mount", lambda path: info if path == str(mnt) else None)
    monkeypatch.setattr(mounts.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(mounts.shutil, "which", lambda name: None)

    def no_daemon(*args, **kwargs):
        raise control.ControlError("gone")

    monkeypatch.setattr(cli.control, "call", no_daemon)
    assert cli.main(["umount", str(mnt)]) == 1
    err = capsys.readouterr().err
    assert "fusermount3 not found" in err, err
