"""Side-by-side comparison of fusecache variants (code versions or options) on one machine.

    python3 -m tests.bench.node_ab [--size-gb 12] [--files 16] [--readers 8] [--rounds 3]
        --variant LABEL[=CODE_DIR][:OPTION,OPTION...] ...

A machine shared with others is noisy: two runs of the same code can differ by half. So the
variants are run in alternation, round after round (A B C A B C ...), and the median of each
is reported with every sample. Each sample is a cold pass (fresh mount, empty cache, page
cache dropped: source -> cache -> readers) followed by a warm one (remount, page cache
dropped: every chunk is checked against its checksum once, then served from the cache).
CODE_DIR is a directory holding another `fusecache` package (e.g. `git archive COMMIT
fusecache | tar -x -C DIR`): the daemon of that variant is started from it. Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .throughput import GiB, drop_caches, make_source, read_all


@dataclass
class Variant:
    label: str
    code_dir: Path | None
    options: list[str]
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        head, _, options = text.partition(":")
        label, _, code_dir = head.partition("=")
        return cls(label, Path(code_dir).resolve() if code_dir else None, [o for o in options.split(",") if o])

    def cli(self, *args: object) -> None:
        """Run `fusecache ARGS` from this variant's code (its dir first on the module path)."""
        command = [sys.executable, "-m", "fusecache", *map(str, args)]
        result = subprocess.run(command, cwd=self.code_dir, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{self.label}: fusecache {args[0]}: {result.stderr.strip()}")


def one_sample(variant: Variant, source: Path, paths: list[Path], mountpoint: Path, cache: Path,
               readers: int) -> None:
    shutil.rmtree(cache, ignore_errors=True)
    mount = ["mount", source, mountpoint, "--cache-dir", cache]
    for option in variant.options:
        mount += ["-o", option]
    through = [mountpoint / p.name for p in paths]
    for samples in (variant.cold, variant.warm):
        variant.cli(*mount)
        drop_caches()
        samples.append(read_all(through, readers, "split", True))
        variant.cli("umount", mountpoint)
    shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=12.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source-dir", type=Path, default=Path("/dev/shm/src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/ab-cache"))
    parser.add_argument("--variant", action="append", required=True, type=Variant.parse)
    args = parser.parse_args()
    paths = make_source(args.source_dir, int(args.size_gb * GiB), args.files)
    mountpoint = Path("/tmp/fusecache-ab")
    mountpoint.mkdir(exist_ok=True)
    started = time.monotonic()
    for _round in range(args.rounds):
        for variant in args.variant:
            one_sample(variant, args.source_dir, paths, mountpoint, args.cache_dir, args.readers)
    print(f"{args.size_gb:g} GiB in {args.files} files, {args.readers} mmap readers (split), "
          f"{args.rounds} alternating rounds in {time.monotonic() - started:.0f} s; GB/s, median [samples]")
    for v in args.variant:
        print(f"{v.label:>16}  cold {statistics.median(v.cold):5.2f} {[round(x, 2) for x in v.cold]}"
              f"  warm {statistics.median(v.warm):5.2f} {[round(x, 2) for x in v.warm]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
