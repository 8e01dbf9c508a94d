"""Option and size parsing: every malformed value is a ConfigError with a one-line message,
never another exception; valid values round-trip. Fuzzed with hypothesis."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusecache.config import ConfigError, MiB, build_config, parse_address, parse_size

from .conftest import run_cli


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("4096", 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("4KB", 4096),
    ("1M", MiB), ("1.5M", 3 * MiB // 2), ("2G", 2 << 30), ("1T", 1 << 40), (" 8 M ", 8 * MiB),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "1X", "1.3", "0x10", "1e6", "1,5M", "nan", "inf", "1 parsec"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


@given(st.text(max_size=20))
@settings(max_examples=400)
def test_parse_size_never_crashes(text):
    try:
        value = parse_size(text)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(value, int) and value >= 0


KEYS = ["cache_dir", "cache_size", "chunk_size", "block_size", "readahead_min_size", "fetch_threads",
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
        assert cfg.chunk_size <= cfg.block_size


@pytest.mark.parametrize("option, message", [
    ("chunk_size=0", "power of two"), ("chunk_size=3M", "power of two"), ("chunk_size=512M", "<= 256M"),
    ("block_size=6M", "multiple of chunk_size"), ("block_size=2G", "<= 1G"),
    ("fetch_threads=0", "between 1 and 256"), ("streams=-1", "between 1 and 64"),
    ("workers=lots", "expected an integer"), ("attr_timeout=-1", "between"), ("attr_timeout=soon", "expected a number"),
    ("readahead=maybe", "expected one of"), ("log_level=loud", "expected one of"), ("allow_other=perhaps", "on/off"),
    ("cache_size=0", "at least 1M"), ("cache_size=200%", "between"), ("cache_size=%", "expected a number"),
    ("metrics_addr=host:port", "expected an integer"), ("metrics_addr=1.2.3.4:70000", "between 1 and 65535"),
    ("cache_dir=", "empty path"), ("chunk_size", "needs a value"), ("colour=blue", "unknown option"),
    ("a,,b", "empty option"),
])
def test_bad_option_values(option, message):
    with pytest.raises(ConfigError, match=message):
        build_config("/src", "/mnt", [option])


def test_generic_mount_options_are_ignored():
    cfg = build_config("/s", "/m", ["rw,nodev,nosuid,_netdev,nofail,noauto,x-systemd.automount,comment=x,defaults"])
    assert cfg.chunk_size == 4 * MiB and not cfg.allow_other


def test_options_apply_in_order_and_flags_win():
    cfg = build_config("/s", "/m", ["chunk_size=1M,cache_size=50%", "chunk_size=2M,allow_other"],
                       cache_dir=Path("/c"))
    assert cfg.chunk_size == 2 * MiB and cfg.allow_other and cfg.cache_size_percent == 50.0
    assert cfg.cache_dir == Path("/c")


def test_parse_address():
    assert parse_address("9100", "a") == ("127.0.0.1", 9100)
    assert parse_address(":9100", "a") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:9100", "a") == ("::1", 9100)


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
