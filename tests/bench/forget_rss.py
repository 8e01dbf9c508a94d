"""The daemon's memory after the kernel forgets what it looked up (audit 2, item 12).

    python3 -m tests.bench.forget_rss [--files 100000] [--dirs 100] [--pymalloc] [--maps]

Mounts a source of `--files` empty files in `--dirs` directories (kernel session, as the
tests do: `python3 -m fusecache`, which inherits PYTHONPATH and the environment), then
samples the daemon's memory three times: after the mount settled, after an lstat of every
file through the mount, and once the kernel forgot them (drop_caches=2, then the daemon's
`inodes_held` back near zero). Printed per sample: VmRSS, and from smaps_rollup the anonymous
and file-backed parts; with `--maps`, the resident anonymous memory per kind of mapping
(the brk heap, pymalloc's 1 MiB arenas, glibc's thread arenas, thread stacks; adjacent
anonymous mappings merge, so this is a rough split). `--pymalloc` runs the daemon on Python's
own allocator instead of the C allocator `fusecache mount` picks (cli.py). The target: the
last VmRSS within 10% of the first. Also printed: the inodes held after the lookups (under
memory pressure the kernel forgets some while the lookups go on). Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from fusecache import control
from tests.bench.throughput import cli

KiB = 1024


def rss(pid: int) -> dict[str, int]:
    """VmRSS and smaps_rollup's Anonymous and file-backed (Rss - Anonymous) bytes."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        rollup[name] = int(value.split()[0]) * KiB
    return {"VmRSS": int(status["VmRSS"].split()[0]) * KiB, "anon": rollup["Anonymous"],
            "file": rollup["Rss"] - rollup["Anonymous"]}


def anonymous_by_kind(pid: int) -> Counter[str]:
    """Resident anonymous bytes per kind of mapping, told apart by name and size: the brk heap
    (glibc's main arena), 1 MiB mappings (pymalloc's arenas), mappings of up to 64 MiB with a
    read-write head (glibc's per-thread arenas), 8 MiB + guard (thread stacks), the rest."""
    kinds: Counter[str] = Counter()
    kind = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size, name = end - start, fields[5] if len(fields) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("["):
                kind = name
            elif name:
                kind = "file"
            elif size == 1 << 20:
                kind = "pymalloc arenas (1 MiB)"
            elif size >= 8 << 20 and size <= (8 << 20) + (64 << 10):
                kind = "thread stacks"
            elif size <= 64 << 20 and fields[1].startswith("rw") and start % (64 << 20) == 0:
                kind = "glibc thread arenas"
            else:
                kind = "other anonymous"
        elif fields[0] == "Anonymous:":
            kinds[kind] += int(fields[1]) * KiB
    return kinds


def cpu_seconds(pid: int) -> float:
    """The daemon's user + system CPU time so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def show(label: str, pid: int, maps: bool) -> dict[str, int]:
    sample = rss(pid)
    print(f"{label:>22}: VmRSS {sample['VmRSS'] / 2**20:6.1f} MiB, anonymous {sample['anon'] / 2**20:6.1f} MiB, "
          f"file {sample['file'] / 2**20:5.1f} MiB", flush=True)
    if maps:
        for kind, size in sorted(anonymous_by_kind(pid).items()):
            print(f"{'':>24}{kind}: {size / 2**20:.1f} MiB")
    return sample


def held(mountpoint: Path) -> int:
    return control.call(str(mountpoint), {"command": "status"})["metrics"]["inodes_held"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--pymalloc", action="store_true",
                        help="run the daemon on pymalloc (PYTHONMALLOC=pymalloc), not the C allocator")
    parser.add_argument("--maps", action="store_true", help="anonymous memory per kind of mapping")
    args = parser.parse_args()
    if args.pymalloc:
        os.environ["PYTHONMALLOC"] = "pymalloc"
    top = Path(tempfile.mkdtemp(prefix="forget-rss-"))
    source, mountpoint, cache = top / "src", top / "mnt", top / "cache"
    per_dir = args.files // args.dirs
    for d in range(args.dirs):
        (source / f"d{d}").mkdir(parents=True)
        for i in range(per_dir):
            (source / f"d{d}" / f"f{i}").touch()
    mountpoint.mkdir()
    cli("mount", source, mountpoint, "--cache-dir", cache, "-o", "session=kernel", "-o", "passthrough=off")
    try:
        pid = control.call(str(mountpoint), {"command": "status"})["pid"]
        time.sleep(2)  # the mount settled (first metrics sample, threads started)
        before = show("at start", pid, args.maps)
        started, cpu = time.monotonic(), cpu_seconds(pid)
        for d in range(args.dirs):
            for i in range(per_dir):
                os.lstat(mountpoint / f"d{d}" / f"f{i}")
        looked_up, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu
        time.sleep(2)
        print(f"{args.dirs * per_dir} lookups in {looked_up:.1f} s, daemon CPU {cpu:.1f} s; "
              f"inodes held: {held(mountpoint)}")
        show("after the lookups", pid, args.maps)
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets dentries and inodes
        deadline = time.monotonic() + 60
        while held(mountpoint) > 100 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        print(f"inodes held: {held(mountpoint)}")
        after = show("once forgotten", pid, args.maps)
        print(f"VmRSS once forgotten / at start: {after['VmRSS'] / before['VmRSS']:.3f} (target: <= 1.10)")
    finally:
        cli("umount", mountpoint)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
