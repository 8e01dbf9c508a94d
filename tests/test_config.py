"""Option and size parsing: every malformed value is a ConfigError with a one-line message,
never another exception; valid values round-trip. Fuzzed with hypothesis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusecache.config import (VERIFY_THREADS, GiB, MAX_SIZE, ConfigError, MiB, MountConfig, build_config, memory_limit,
                              parse_address, parse_size)

from .conftest import run_cli


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("4096", 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("4KB", 4096),
    ("1M", MiB), ("1.5M", 3 * MiB // 2), ("2G", 2 << 30), ("1T", 1 << 40), (" 8 M ", 8 * MiB),
    ("64MiB", 64 * MiB), ("1.5G", 3 << 29), ("0.25K", 256), (str(MAX_SIZE), MAX_SIZE),
    ("9007199254740993", 2**53 + 1),  # a float would make it 2**53
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "1X", "1.3", "0x10", "1e6", "1,5M", "nan", "inf", "1 parsec"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["cache_size", "chunk_size", "stream_read_size", "readahead_min_size", "sequential_window"])
@pytest.mark.parametrize("value", ["1" * 400, "1" * 400 + "G", str(MAX_SIZE + 1), "8388608T", "1" * 5000 + ".5"])
def test_too_large_sizes_are_refused(key, value):
    """Exact parsing: through a float, 400 digits were an OverflowError traceback."""
    with pytest.raises(ConfigError, match=f"invalid {key} .*: too large"):
        build_config("/src", "/mnt", [f"{key}={value}"])


def test_long_fractions_are_parsed_exactly():
    assert parse_size("0.5" + "0" * 5000 + "K") == 512
    with pytest.raises(ConfigError, match="not a whole number"):
        parse_size("0." + "5" * 5000)


@given(st.text(max_size=20))
@settings(max_examples=400)
def test_parse_size_never_crashes(text):
    try:
        value = parse_size(text)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(value, int) and value >= 0


KEYS = ["cache_dir", "cache_size", "chunk_size", "stream_read_size", "readahead_min_size", "fetch_threads",
        "streams", "workers", "attr_timeout", "read_ahead_kb", "max_background", "readahead",
        "log_level", "allow_other", "foreground", "metrics_addr", "metrics_textfile", "colour", "rw", ""]


@given(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.text(max_size=12))), max_size=4))
@settings(max_examples=400)
def test_option_parsing_never_crashes(items):
    text = ",".join(key if value is None else f"{key}={value}" for key, value in items)
    try:
        cfg = build_config("/src", "/mnt", [text] if text else [])
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
    else:
        cfg.validate()
        assert cfg.chunk_size <= cfg.stream_read_size


@pytest.mark.parametrize("option, message", [
    ("chunk_size=0", "power of two"), ("chunk_size=3M", "power of two"), ("chunk_size=512M", "<= 256M"),
    ("stream_read_size=6M", "multiple of chunk_size"), ("stream_read_size=2G", "<= 1G"),
    ("fetch_threads=0", "between 1 and 256"), ("streams=-1", "between 1 and 64"),
    ("workers=lots", "expected an integer"), ("attr_timeout=-1", "between"), ("attr_timeout=soon", "expected a number"),
    ("readahead=maybe", "expected one of"), ("log_level=loud", "expected one of"), ("allow_other=perhaps", "on/off"),
    ("cache_size=0", "at least 1M"), ("cache_size=200%", "between"), ("cache_size=%", "expected a number"),
    ("metrics_addr=host:port", "expected an integer"), ("metrics_addr=1.2.3.4:70000", "between 1 and 65535"),
    ("metrics_addr=a..b:9100", "not a host name"), (f"metrics_addr={'x' * 64}:9100", "not a host name"),
    ("cache_dir=", "empty path"), ("cache_dir=/a\0b", "holds no NUL"), ("chunk_size", "needs a value"), ("colour=blue", "unknown option"),
    ("a,,b", "empty option"),
])
def test_bad_option_values(option, message):
    with pytest.raises(ConfigError, match=message):
        build_config("/src", "/mnt", [option])


def test_empty_paths_are_refused_and_an_empty_option_string_is_no_option():
    """An empty source or mountpoint meant the directory the command ran in (mounted over
    it); `-o ""` (an env file without OPTIONS=) was an "empty option" error. (Found by review.)"""
    for source, mountpoint in (("", "/m"), ("/s", "")):
        with pytest.raises(ConfigError, match="empty path"):
            build_config(source, mountpoint, [])
    for source, mountpoint in (("/s\0", "/m"), ("/s", "/m\0")):  # a restart's, from a daemon's reply
        with pytest.raises(ConfigError, match="holds no NUL"):
            build_config(source, mountpoint, [])
    assert build_config("/s", "/m", [""]).options == build_config("/s", "/m", []).options == []


def test_generic_mount_options_are_ignored():
    cfg = build_config("/s", "/m", ["rw,nodev,nosuid,_netdev,nofail,noauto,x-systemd.automount,comment=x,defaults"])
    assert cfg.chunk_size == 4 * MiB and not cfg.allow_other


def test_options_apply_in_order_and_flags_win():
    cfg = build_config("/s", "/m", ["chunk_size=1M,cache_size=50%", "chunk_size=2M,allow_other"],
                       cache_dir=Path("/c"))
    assert cfg.chunk_size == 2 * MiB and cfg.allow_other and cfg.cache_size_percent == 50.0
    assert cfg.cache_dir == Path("/c")


def test_relative_paths_are_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """The daemon runs in /, and `fusecache restart`, run from anywhere, mounts with the
    options the daemon was given: a relative source, cache dir or textfile read in either
    place would be another tree, cache or file (a restart served another tree, silently)."""
    monkeypatch.chdir(tmp_path)
    cfg = build_config("src", "mnt", ["ro,cache_dir=c", "metrics_textfile=m.prom"])
    assert (cfg.source, cfg.mountpoint) == (tmp_path / "src", tmp_path / "mnt")
    assert (cfg.cache_dir, cfg.metrics_textfile) == (tmp_path / "c", tmp_path / "m.prom")
    assert cfg.options == ["ro", f"cache_dir={tmp_path / 'c'}", f"metrics_textfile={tmp_path / 'm.prom'}"]
    assert build_config("s", "m", [], cache_dir=Path("d")).cache_dir == tmp_path / "d"
    monkeypatch.chdir("/")
    again = build_config(str(cfg.source), str(cfg.mountpoint), cfg.options)  # a restart from elsewhere
    assert (again.cache_dir, again.metrics_textfile) == (cfg.cache_dir, cfg.metrics_textfile)


def test_paths_through_a_symlink_are_resolved_once_at_the_mount(tmp_path):
    """The cache dir's and the textfile's directories are checked at mount (only root or the
    daemon's user may write them); reached later through a symlink the checks never saw, a
    link re-pointed by the user owning the directory that holds it sent root's writes
    elsewhere. (And a textfile's directory reached through a link was never written: its
    writes open the directory without following links.)"""
    real = Path(os.path.realpath(tmp_path)) / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cfg = build_config("/s", "/m", [f"cache_dir={tmp_path}/link/cache", f"metrics_textfile={tmp_path}/link/m.prom"])
    assert (cfg.cache_dir, cfg.metrics_textfile) == (real / "cache", real / "m.prom")
    (real / "m.prom").symlink_to("/elsewhere.prom")  # the file itself is replaced by a rename, not followed
    assert build_config("/s", "/m", [f"metrics_textfile={tmp_path}/link/m.prom"]).metrics_textfile == real / "m.prom"


def test_a_path_resolving_to_one_with_a_comma_is_refused_at_the_mount(tmp_path):
    """Resolved paths are recorded as options for a restart or a crash's recovery, which split
    them at commas: a link to a directory whose name holds one made the restart refused and
    the recovery end the mount. Refused when mounting, where the user can mend it. (Found by
    review.)"""
    target = tmp_path / "metrics,dir"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    for key in ("metrics_textfile", "cache_dir"):
        with pytest.raises(ConfigError, match="cannot hold a comma"):
            build_config("/s", "/m", [f"{key}={tmp_path}/link/x"])
    cfg = build_config("/s", "/m", [f"cache_dir={tmp_path}/cache", f"metrics_textfile={tmp_path}/m.prom"])
    assert build_config("/s", "/m", cfg.options).options == cfg.options  # as a restart reads them again


def test_a_home_of_no_user_is_a_config_error():
    with pytest.raises(ConfigError, match="no such user's home"):
        build_config("/s", "/m", ["cache_dir=~no-such-user-here/cache"])


def test_renamed_options_keep_their_old_spelling_with_a_warning():
    cfg = build_config("/s", "/m", ["block_size=16M,fetch_ahead=2M"])
    assert (cfg.stream_read_size, cfg.sequential_window) == (16 * MiB, 2 * MiB)
    assert cfg.deprecations == ["option 'block_size' is deprecated: use 'stream_read_size'",
                                "option 'fetch_ahead' is deprecated: use 'sequential_window'"]
    assert build_config("/s", "/m", ["stream_read_size=16M"]).deprecations == []


def test_parse_address():
    assert parse_address("9100", "a") == ("127.0.0.1", 9100)
    assert parse_address(":9100", "a") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:9100", "a") == ("::1", 9100)
    for unbracketed in ("::1", "::1:9100", "fe80::1"):  # was host ":", port 1 and the like
        with pytest.raises(ConfigError, match="in brackets"):
            parse_address(unbracketed, "a")


@pytest.mark.parametrize("args", [
    ["mount"], ["mount", "/a"], ["mount", "/a", "/b", "-o"], ["mount", "/a", "/b", "--log-level", "loud"],
    ["umount"], ["status", "--bogus"], ["prefetch"], ["pin"], ["unpin"], ["cache"], ["cache", "ls"],
    ["cache", "clear"], ["cache", "explode"], ["demo", "--size-mb", "big"], ["--nope"],
    ["/a", "/b", "-o", "chunk_size=7"],
])
def test_malformed_command_lines(args):
    result = run_cli(*args, check=False)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("fusecache: "), result.stderr


def test_buffers_beyond_half_the_memory_are_refused():
    """max(streams, fill_reads_max) x stream_read_size + fetch_threads x 2 x chunk_size +
    verifying threads (one per core, at most 16) x 2 x chunk_size + (workers + queues) x 1M must
    fit in half of the memory: the defaults take 608 MiB plus 8 MiB per verifying thread and
    1 MiB per queue."""
    defaults = MountConfig(source=Path("/s"), mountpoint=Path("/m"))
    total = 608 * MiB + VERIFY_THREADS * 8 * MiB + defaults.queues * MiB
    assert defaults.buffer_bytes() == total
    defaults.validate(memory=lambda: 2 * total)
    with pytest.raises(ConfigError, match=rf"buffers would take {total / MiB:.1f} MiB, more than half of the memory"):
        defaults.validate(memory=lambda: 2 * total - 1)
    big = MountConfig(source=Path("/s"), mountpoint=Path("/m"), streams=64, stream_read_size=1 * GiB)
    with pytest.raises(ConfigError) as info:
        big.validate(memory=lambda: 64 * GiB)
    message = str(info.value)
    assert "64.1 GiB" in message or "64.2 GiB" in message and "(64.0 GiB)" in message and "max(streams, fill_reads_max) x stream_read_size (64 x 1.0 GiB)" in message
    assert "fetch_threads x 2 x chunk_size (8 x 2 x 4.0 MiB)" in message and "(workers + queues) x 1.0 MiB" in message


def test_memory_limit_is_the_lowest_cgroup_v2_limit(tmp_path):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16777216 kB\nMemFree:         1024 kB\n")
    (proc / "self" / "cgroup").write_text("0::/\n")
    assert memory_limit(proc, cgroups) == 16 * GiB  # no cgroup v2 mounted there
    (proc / "self" / "cgroup").write_text("0::/system.slice/job.service\n")
    (cgroups / "system.slice" / "job.service").mkdir(parents=True)
    (cgroups / "system.slice" / "job.service" / "memory.max").write_text("max\n")
    assert memory_limit(proc, cgroups) == 16 * GiB
    (cgroups / "system.slice" / "memory.max").write_text(f"{4 * GiB}\n")  # a parent caps it too
    assert memory_limit(proc, cgroups) == 4 * GiB
    (cgroups / "system.slice" / "job.service" / "memory.max").write_text(f"{2 * GiB}\n")
    assert memory_limit(proc, cgroups) == 2 * GiB
    (cgroups / "system.slice" / "job.service" / "memory.max").write_text(f"{32 * GiB}\n")
    assert memory_limit(proc, cgroups) == 4 * GiB


def test_memory_limit_of_this_process():
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    assert 0 < memory_limit() <= int(meminfo[1]) * 1024


@pytest.mark.parametrize("options, message", [
    (["chunk_size=96K"], "must be a power of two"),
    (["chunk_size=512M", "stream_read_size=1G"], "must be <= 256M"),
    (["stream_read_size=6M"], "must be a multiple of chunk_size"),
    (["stream_read_size=2G"], "must be <= 1G"),
    (["sequential_window=2G"], "must be <= 1G"),
    (["cache_size=100K"], "must be at least 1M"),
    (["cache_size=200%"], "between 0.1 and 100.0"),
    (["readahead=maybe"], "expected one of all, shards, off"),
    (["readers=fibers"], "expected one of auto, threads, processes"),
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
