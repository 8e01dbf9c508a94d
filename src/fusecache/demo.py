"""`fusecache demo`: the main job on an embedded default.

Generates a small sharded safetensors checkpoint, mounts it through fusecache, loads it with
safe_open the way an inference engine does, remounts and loads it again from the warm cache,
and prints what crossed from the source each time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .checkpoint import load_digest, write_checkpoint

MiB = 1 << 20


def _cli(*args: object) -> str:
    result = subprocess.run([sys.executable, "-m", "fusecache", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr.strip() or f"fusecache {args[0]} failed")
    return result.stdout


def _load(mountpoint: Path, label: str, expected: str) -> dict:
    started = time.monotonic()
    digest = load_digest(mountpoint / "model")
    seconds = time.monotonic() - started
    metrics = json.loads(_cli("status", mountpoint, "--json"))["metrics"]
    ok = "identical to the source" if digest == expected else "DIFFERENT FROM THE SOURCE"
    print(f"{label:<28} {seconds:6.2f} s   from source {metrics['bytes_from_source'] / MiB:7.1f} MiB   "
          f"served {metrics['bytes_served'] / MiB:7.1f} MiB ({metrics['bytes_served_from_cache'] / MiB:.1f} "
          f"MiB from cache)   tensors {ok}")
    return {"digest_ok": digest == expected, **metrics}


def run_demo(workdir: str | None, size_mb: int) -> int:
    with tempfile.TemporaryDirectory(prefix="fusecache-demo-", dir=workdir) as tmp:
        root = Path(tmp)
        source, mountpoint, cache = root / "source", root / "mnt", root / "cache"
        mountpoint.mkdir()
        print(f"writing a {size_mb} MiB safetensors checkpoint (4 shards) to {source}/model")
        write_checkpoint(source / "model", size_mb * MiB, shards=4)
        expected = load_digest(source / "model")
        print(f"mounting {source} at {mountpoint} (cache {cache})")
        _cli("mount", source, mountpoint, "--cache-dir", cache)
        try:
            cold = _load(mountpoint, "cold load through mount:", expected)
        finally:
            _cli("umount", mountpoint)
        _cli("mount", source, mountpoint, "--cache-dir", cache)
        try:
            warm = _load(mountpoint, "after remount (warm cache):", expected)
            print(_cli("status", mountpoint))
        finally:
            _cli("umount", mountpoint)
    ok = cold["digest_ok"] and warm["digest_ok"] and warm["bytes_from_source"] == 0
    print("demo " + ("passed: every tensor matched; the remount read nothing from the source" if ok else "FAILED"))
    return 0 if ok else 1
