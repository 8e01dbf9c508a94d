"""Mount configuration: one dataclass, and the parsers that fill it from `-o` options.

Every setting can be spelled as an `-o key=value` option because that is the only form
mount(8), fstab and systemd mount units can pass (mount.fuse3 runs
`fusecache SOURCE MOUNTPOINT -o opts`). The long command-line flags are sugar for the same keys.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
MAX_SIZE = 2**63 - 1  # the largest file size or offset the kernel handles
# The largest FUSE read the kernel sends (libfuse asks for 256 pages): each worker keeps one
# reply buffer of this size (the session's pool: session/kernel.py), so it is what a worker costs.
MAX_REQUEST = 1 * MiB
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Options that mount(8), fstab and systemd hand to every filesystem helper. They mean
# nothing to a read-only FUSE mirror, so they are accepted and ignored rather than rejected.
_GENERIC_MOUNT_FLAGS = frozenset(
    {"rw", "ro", "defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev",
     "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
     "norelatime", "strictatime", "diratime", "nodiratime", "async", "sync", "owner", "group"}
)
_GENERIC_MOUNT_PREFIXES = ("x-", "comment=", "x-systemd.")

READAHEAD_MODES = ("all", "shards", "off")
SESSIONS = ("kernel", "pyfuse3")
VERIFY_MODES = ("sealed", "always")
READERS = ("auto", "threads", "processes")
# Threads that check a cached file's chunks before its first passthrough open (CPU and memory
# bound: as wide as the machine), each with a buffer of VERIFY_RUN_CHUNKS chunks.
VERIFY_THREADS = min(16, os.cpu_count() or 1)
VERIFY_RUN_CHUNKS = 2
SOURCE_INODES = ("auto", "stable", "unstable")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A user-supplied setting is malformed; its message is shown as the one-line error."""


def parse_size(text: str, what: str = "size") -> int:
    """Parse '4M', '64MiB', '1.5G' or a plain byte count into bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"invalid {what} {text!r}: expected a number with an optional K/M/G/T suffix")
    number, unit = match.groups()
    # Exact arithmetic: through a float, 400 digits become inf (an OverflowError, not a message)
    # and large values lose their last digits. Decimal keeps every digit of the text.
    value = Fraction(Decimal(number)) * _SIZE_UNITS[unit.lower()]
    if value > MAX_SIZE:
        raise ConfigError(f"invalid {what} {text!r}: too large (at most {MAX_SIZE} bytes)")
    if value.denominator != 1:
        raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


def human(n: float) -> str:
    """A size as people read it: '512 B', '1.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def parse_int(text: str, what: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an integer") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"invalid {what} {value}: must be between {minimum} and {maximum}")
    return value


def parse_float(text: str, what: str, minimum: float, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected a number") from None
    if not (minimum <= value <= maximum):
        raise ConfigError(f"invalid {what} {text}: must be between {minimum} and {maximum}")
    return value


def parse_bool(text: str, what: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"invalid {what} {text!r}: expected on/off")


def parse_choice(text: str, what: str, choices: tuple[str, ...]) -> str:
    if text.lower() not in choices:
        raise ConfigError(f"invalid {what} {text!r}: expected one of {', '.join(choices)}")
    return text.lower()


def default_cache_dir() -> Path:
    """/var/cache/fusecache for root, else $XDG_CACHE_HOME/fusecache (~/.cache by default)."""
    if os.geteuid() == 0:
        return Path("/var/cache/fusecache")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fusecache"


def runtime_dirs(uid: int) -> list[Path]:
    """Where the control sockets of uid's mounts may live, the preferred first: derived from
    the uid alone, so any client can find the socket of a mount from the mount's owner
    (user_id in mountinfo). A user's are in /run/user/UID while logind provides it, else in
    /tmp; a mount made without it (from cron) keeps /tmp once a login makes it, so both are
    places to look (control.socket_path)."""
    if uid == 0:
        return [Path("/run/fusecache")]
    user_run, tmp = Path(f"/run/user/{uid}"), Path(f"/tmp/fusecache-{uid}")
    return [user_run / "fusecache", tmp] if user_run.is_dir() else [tmp]


def memory_limit(proc: Path = Path("/proc"), cgroups: Path = CGROUP_ROOT) -> int:
    """Bytes of memory this process can have: MemTotal, or less where the memory.max of its
    cgroup v2 (or of one above it, which caps it as well) is lower."""
    with open(proc / "meminfo") as f:
        limit = next(int(line.split()[1]) * KiB for line in f if line.startswith("MemTotal:"))
    with open(proc / "self" / "cgroup") as f:
        group = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    if group is None:
        return limit  # no cgroup v2
    leaf = cgroups / group.lstrip("/")
    for directory in (leaf, *leaf.parents):
        if not directory.is_relative_to(cgroups):
            break
        try:
            value = (directory / "memory.max").read_text().strip()
        except OSError:
            continue  # the root cgroup has none; nor does a v1 or hybrid layout
        if value != "max":
            limit = min(limit, int(value))
    return limit


@dataclass
class MountConfig:
    """Everything a mount needs; defaults are the measured or documented production choices."""

    source: Path
    mountpoint: Path
    cache_dir: Path = field(default_factory=default_cache_dir)
    # Unit of caching, validation (checksum) and single-flight. 4 MiB: larger than the 1 MiB
    # requests the kernel sends, so one fetch answers several requests; small enough that a
    # demand read that jumps the readahead queue waits for little more than it asked for.
    chunk_size: int = 4 * MiB
    # Demand fetches run on their own threads so they never queue behind readahead.
    fetch_threads: int = 8
    # Readahead: which files are streamed whole on first open, in what reads, how many at once.
    readahead: str = "shards"
    readahead_min_size: int = 0
    # Files streamed at once, reads of a stream, and stream reads in flight node-wide at most
    # (from `streams` up, grown while the source delivers more for it: engine/fill.py; each
    # holds a buffer of stream_read_size). A network filesystem gives one sequential reader a
    # fraction of the node's bandwidth, and writes into one cache file are serialized by the
    # cache filesystem, so the fill wants many files at once with several reads each: against
    # a Lustre-like source these fill at 3.2x the rate of 2 files and 16 reads of 32 MiB, in
    # the same buffer memory (docs/benchmarks.md).
    stream_read_size: int = 16 * MiB  # was block_size
    streams: int = 16
    fill_reads_max: int = 32
    # A sequential reader's next bytes, fetched on the demand lane while its current ones are
    # served, so it does not stall once per chunk where it runs ahead of its file's stream.
    # 0: off (as is everything ahead with readahead=off). Was fetch_ahead.
    sequential_window: int = 8 * MiB
    # Concurrent FUSE requests the daemon works on; each holds one reply buffer.
    workers: int = 32
    # Threads reading the FUSE connection, each through its own duplicate of the descriptor; they
    # answer reads of files complete in the cache themselves (session/queues.py). 1: the trio
    # thread reads every request itself. Kernel session only.
    queues: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8))
    # What reads it with queues > 1: processes, each with a GIL of its own (session/reader_process.py),
    # or threads of the daemon. auto: processes where the cache is in memory (tmpfs), threads on a
    # disk, whose replies drop the cache file's pages together (engine/direct.py).
    readers: str = "auto"
    attr_timeout: float = 1.0
    # Kernel readahead of the mount. The default 128 KiB makes the kernel send 128 KiB reads;
    # 4 MiB (one chunk) gives reads of the most INIT allows (1 MiB, or 512 KiB where reader
    # processes' pipes hold no more: session/direct.py), as fast as 16 MiB when memory is
    # ample and far cheaper under a memory cap, where pages read far ahead are evicted before
    # use (docs/benchmarks.md).
    read_ahead_kb: int = 4096
    max_background: int = 64
    # Cache size: bytes, or a percentage of the cache filesystem's size. None: 80% of the
    # space free for the cache at mount time, plus what the store already holds.
    cache_size: int | None = None
    cache_size_percent: float | None = None
    # Prometheus: serve /metrics on HOST:PORT, and/or rewrite a node-exporter textfile.
    metrics_addr: tuple[str, int] | None = None
    metrics_textfile: Path | None = None
    # Whether the source's inode numbers identify its files for good; auto: all but FUSE sources.
    source_inodes: str = "auto"
    # Who speaks to the kernel: our own session ("kernel", which can do passthrough) or
    # libfuse through pyfuse3 (the fallback for platforms where ours cannot run).
    session: str = "kernel"
    # Let the kernel read complete, verified cache files itself (needs Linux >= 6.9 and root).
    passthrough: bool = True
    # How long an open of a file being streamed waits for it to complete, to get passthrough
    # instead of being served through the daemon (docs/benchmarks.md).
    passthrough_wait: float = 60.0
    # What a restart trusts of a complete cache file: "sealed" serves a file whose seal still
    # matches its data file without reading it; "always" checks every chunk again first.
    verify: str = "sealed"
    allow_other: bool = False
    foreground: bool = False
    # one line each about options spelled the old way, shown once the mount starts
    deprecations: list[str] = field(default_factory=list, repr=False)
    # the -o option strings as given: a restart starts the next daemon with them (handover.py)
    options: list[str] = field(default_factory=list, repr=False)
    log_level: str = "info"

    def buffer_bytes(self) -> int:
        """The memory the daemon's buffers take at most (engine.fetcher.Lane, session replies):
        each stream read in flight holds one stream_read_size, each demand fetch thread a run
        of two chunks, each verifying thread a run of VERIFY_RUN_CHUNKS, each worker and each queue a reply."""
        return (self.stream_reads * self.stream_read_size + self.fetch_threads * 2 * self.chunk_size
                + VERIFY_THREADS * VERIFY_RUN_CHUNKS * self.chunk_size + (self.workers + self.queues) * MAX_REQUEST)

    @property
    def stream_reads(self) -> int:
        """Stream reads in flight at most: fill_reads_max, and at least one per stream."""
        return max(self.streams, self.fill_reads_max)

    def validate(self, memory: Callable[[], int] = memory_limit) -> None:
        """Refuse settings the daemon cannot work with. `memory` says how much memory there
        is (tests pass their own)."""
        if self.chunk_size < 64 * KiB or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"invalid chunk_size {self.chunk_size}: must be a power of two >= 64K")
        if self.chunk_size > 256 * MiB:
            raise ConfigError(f"invalid chunk_size {self.chunk_size}: must be <= 256M")
        if self.stream_read_size < self.chunk_size or self.stream_read_size % self.chunk_size:
            raise ConfigError(
                f"invalid stream_read_size {self.stream_read_size}: must be a multiple of chunk_size ({self.chunk_size})"
            )
        if self.stream_read_size > 1 * GiB:
            raise ConfigError(f"invalid stream_read_size {self.stream_read_size}: must be <= 1G")
        if self.sequential_window > 1 * GiB:
            raise ConfigError(f"invalid sequential_window {self.sequential_window}: must be <= 1G")
        # Buffers take memory only once used, so an oversized setting mounts fine and fails
        # (OOM kill, swapping) only under load. Half leaves room for the readers and the page
        # cache they are served through.
        total, available = self.buffer_bytes(), memory()
        if total > available // 2:
            raise ConfigError(
                f"the daemon's buffers would take {human(total)}, more than half of the memory "
                f"({human(available)}): "
                f"lower max(streams, fill_reads_max) x stream_read_size ({self.stream_reads} x "
                f"{human(self.stream_read_size)}), "
                f"fetch_threads x 2 x chunk_size ({self.fetch_threads} x 2 x {human(self.chunk_size)}) "
                f"or (workers + queues) x {human(MAX_REQUEST)} ({self.workers} + {self.queues})")


def _set_cache_size(cfg: MountConfig, key: str, value: str) -> None:
    if value.strip().endswith("%"):
        cfg.cache_size_percent = parse_float(value.strip()[:-1], key, 0.1, 100.0)
        cfg.cache_size = None
    else:
        cfg.cache_size = parse_size(value, key)
        cfg.cache_size_percent = None
        if cfg.cache_size < 1 * MiB:
            raise ConfigError(f"invalid {key} {value!r}: must be at least 1M")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (host defaults to 127.0.0.1: metrics stay local unless asked)."""
    host, sep, port = text.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"invalid {what} {text!r}: an IPv6 address goes in brackets, [ADDRESS]:PORT")
    host = host.strip("[]") if sep else ""
    try:
        host.encode("idna")  # what the resolver is given: an empty or over-long label fails there
    except UnicodeError:
        raise ConfigError(f"invalid {what} {text!r}: not a host name") from None
    return host or "127.0.0.1", parse_int(port, f"{what} port", 1, 65535)


def _set_path(cfg: MountConfig, key: str, value: str) -> None:
    if not value:
        raise ConfigError(f"invalid {key}: empty path")
    if "\0" in value:  # no system call takes it (realpath raised ValueError)
        raise ConfigError(f"invalid {key} {value!r}: a path holds no NUL")
    try:
        path = os.path.abspath(Path(value).expanduser())
    except RuntimeError:  # ~name of a user who does not exist
        raise ConfigError(f"invalid {key} {value!r}: no such user's home") from None
    # Resolved once, now: the directories checked at mount (private.check_ancestors) are the
    # ones every later use reaches, wherever a symlink on the way has been pointed since. A
    # textfile itself is not followed: it is replaced by a rename.
    directory, name = os.path.split(path)
    resolved = Path(os.path.realpath(directory), name) if key == "metrics_textfile" else Path(os.path.realpath(path))
    if "," in str(resolved):  # recorded as an option for restarts, where a comma separates two
        raise ConfigError(f"invalid {key} {value!r}: it resolves to {str(resolved)!r}, and a path in a mount "
                          f"option cannot hold a comma")
    setattr(cfg, key, resolved)


# key -> how to apply its value; flags (no '=') are handled as value None.
_OPTION_SETTERS = {
    "cache_dir": _set_path,
    "cache_size": _set_cache_size,
    "metrics_addr": lambda c, k, v: setattr(c, k, parse_address(v, k)),
    "metrics_textfile": _set_path,
    "chunk_size": lambda c, k, v: setattr(c, k, parse_size(v, k)),
    "stream_read_size": lambda c, k, v: setattr(c, k, parse_size(v, k)),
    "readahead_min_size": lambda c, k, v: setattr(c, k, parse_size(v, k)),
    "sequential_window": lambda c, k, v: setattr(c, k, parse_size(v, k)),
    "fetch_threads": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 256)),
    "streams": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 64)),
    "fill_reads_max": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 256)),
    "workers": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 1024)),
    "queues": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 64)),
    "readers": lambda c, k, v: setattr(c, k, parse_choice(v, k, READERS)),
    "attr_timeout": lambda c, k, v: setattr(c, k, parse_float(v, k, 0.0, 86400.0)),
    "read_ahead_kb": lambda c, k, v: setattr(c, k, parse_int(v, k, 0, 1 << 20)),
    "max_background": lambda c, k, v: setattr(c, k, parse_int(v, k, 1, 65535)),
    "readahead": lambda c, k, v: setattr(c, k, parse_choice(v, k, READAHEAD_MODES)),
    "source_inodes": lambda c, k, v: setattr(c, k, parse_choice(v, k, SOURCE_INODES)),
    "session": lambda c, k, v: setattr(c, k, parse_choice(v, k, SESSIONS)),
    "verify": lambda c, k, v: setattr(c, k, parse_choice(v, k, VERIFY_MODES)),
    "passthrough": lambda c, k, v: setattr(c, k, parse_bool(v, k)),
    "passthrough_wait": lambda c, k, v: setattr(c, k, parse_float(v, k, 0.0, 86400.0)),
    "log_level": lambda c, k, v: setattr(c, k, parse_choice(v, k, LOG_LEVELS)),
    "allow_other": lambda c, k, v: setattr(c, k, parse_bool(v, k)),
    "foreground": lambda c, k, v: setattr(c, k, parse_bool(v, k)),
}
_FLAG_OPTIONS = frozenset({"allow_other", "foreground"})
# Old spellings, still accepted. Five options read ahead in five ways; these two names said
# the least about which: `block_size` is the read size of a whole-file stream, `fetch_ahead`
# the window fetched past a sequential reader.
_RENAMED = {"block_size": "stream_read_size", "fetch_ahead": "sequential_window"}


def split_options(text: str) -> list[str]:
    """Split a mount option string on commas; empty items (from ',,') are an error, an empty
    string is no option (`-o "${OPTIONS}"` from an env file that sets none)."""
    if not text:
        return []
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise ConfigError(f"invalid option list {text!r}: empty option")
    return [item.strip() for item in items]


def apply_option(cfg: MountConfig, item: str) -> str:
    """Apply one `key=value` or `flag` mount option to cfg; the option as a restart is to be
    given it (a path made absolute and resolved by _set_path, else as it came)."""
    key, sep, value = item.partition("=")
    if item in _GENERIC_MOUNT_FLAGS or item.startswith(_GENERIC_MOUNT_PREFIXES):
        log.debug("ignoring generic mount option %s", item)
        return item
    if key in _RENAMED:
        cfg.deprecations.append(f"option {key!r} is deprecated: use {_RENAMED[key]!r}")
        key = _RENAMED[key]
    setter = _OPTION_SETTERS.get(key)
    if setter is None:
        raise ConfigError(f"unknown option {key!r}")
    if not sep:
        if key not in _FLAG_OPTIONS:
            raise ConfigError(f"option {key!r} needs a value ({key}=...)")
        value = "on"
    setter(cfg, key, value)
    return f"{key}={getattr(cfg, key)}" if setter is _set_path else item


def build_config(source: str, mountpoint: str, options: list[str], **overrides: object) -> MountConfig:
    """Build and validate a MountConfig from -o option strings plus explicit overrides.
    Paths are made absolute here, against the directory the command runs in: the daemon
    runs elsewhere (in /), and a restart, from wherever it is asked for, mounts with
    `options` again, whose paths are rewritten absolute to that end."""
    for name, path in (("source", source), ("mountpoint", mountpoint)):
        if not path:  # abspath("") is the directory the command runs in
            raise ConfigError(f"empty path for the {name}")
        if "\0" in path:  # a restart's, from a daemon's reply
            raise ConfigError(f"invalid {name} {path!r}: a path holds no NUL")
    cfg = MountConfig(source=Path(os.path.abspath(source)), mountpoint=Path(os.path.abspath(mountpoint)))
    for text in options:
        for item in split_options(text):
            cfg.options.append(apply_option(cfg, item))
    for key, value in overrides.items():
        if isinstance(value, Path):
            _set_path(cfg, key, str(value))
        elif value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg

