"""transformers' from_pretrained onto the GPU, directly and through fusecache after a restart
(issue 20's target: after a restart, within 1.05x of a direct load).

    python3 -m tests.bench.hf_load [--layers 28] [--hidden 3072] [--rounds 2]
        [--model-dir /dev/shm/hf-src] [--cache-dir /dev/shm/hf-cache]

Makes a Llama-shaped model of random bf16 weights once (save_pretrained: safetensors shards),
fills a fusecache cache with it and waits for the seals, then in each round, the variants
alternating: a direct load of the model dir; a load through a freshly remounted fusecache
(verify=sealed, the default: the first pass after a restart); the same with verify=always.
The page cache is dropped before every load (a tmpfs source and cache stay in memory: what is
dropped is the mount's own pages). Prints the seconds of each load. Needs root, a GPU, torch
and transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tests.bench.throughput import cli, drop_caches

MOUNTPOINT = Path("/tmp/hf-mnt")


def make_model(directory: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "config.json").exists():
        return
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def load(directory: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    drop_caches()
    torch.cuda.synchronize()
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    del model
    torch.cuda.empty_cache()
    return seconds


def mount(source: Path, cache: Path, *options: str) -> None:
    MOUNTPOINT.mkdir(exist_ok=True)
    args: list[object] = ["mount", source, MOUNTPOINT, "--cache-dir", cache]
    for option in options:
        args += ["-o", option]
    cli(*args)


def sealed(cache: Path) -> bool:
    indexes = list(cache.rglob("*.idx"))
    return bool(indexes) and all(index.read_bytes()[-48:].startswith(b"FCSEAL01") for index in indexes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path("/dev/shm/hf-src"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/dev/shm/hf-cache"))
    args = parser.parse_args()
    make_model(args.model_dir / "model", args.layers, args.hidden)
    size = sum(p.stat().st_size for p in (args.model_dir / "model").iterdir())
    print(f"model: {size / 1e9:.2f} GB in {len(list((args.model_dir / 'model').glob('*.safetensors')))} shards",
          flush=True)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    mount(args.model_dir, args.cache_dir)
    cli("prefetch", MOUNTPOINT)
    deadline = time.monotonic() + 120
    while not sealed(args.cache_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    cli("umount", MOUNTPOINT)
    variants = {
        "direct": lambda: load(args.model_dir / "model"),
        "restart, sealed": lambda: through_mount(args),
        "restart, verify=always": lambda: through_mount(args, "verify=always"),
    }
    try:
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                print(f"round {round_ + 1}: {name}: {variants[name]():.2f} s", flush=True)
    finally:
        if MOUNTPOINT.is_mount():
            cli("umount", MOUNTPOINT)
    return 0


def through_mount(args: argparse.Namespace, *options: str) -> float:
    mount(args.model_dir, args.cache_dir, *options)
    try:
        seconds = load(MOUNTPOINT / "model")
        status = json.loads(cli("status", MOUNTPOINT, "--json"))
        assert status["metrics"]["bytes_from_source"] == 0, status["metrics"]
        return seconds
    finally:
        cli("umount", MOUNTPOINT)


if __name__ == "__main__":
    raise SystemExit(main())
