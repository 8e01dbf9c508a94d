#!/usr/bin/env bash
# Node-scale cold-path benchmark (issue 7), run on the 16-core device machine:
#   [CONFIGS="tmpfs-8 tmpfs-1 disk-8 fetch-ahead profile profile-warm passthrough"] bash tests/bench/node_bench.sh [SIZE_GB]
# (logs and profile under $OUT, or ./node-bench)
# Installs from the carried .device dir (tests/bench/node_setup.sh), then measures 1 and 8
# mmap readers over a tmpfs source with the cache on tmpfs and on disk, and profiles the
# daemon (py-spy) during an 8-reader cold pass.
set -euo pipefail
SIZE=${1:-24}
CONFIGS=" ${CONFIGS:-tmpfs-8 tmpfs-1 disk-8 profile passthrough} "
OUT=${OUT:-node-bench}; mkdir -p "$OUT"
bash tests/bench/node_setup.sh > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
export PATH=/tmp/fuse-root/bin:/tmp/fuse-root/sbin:/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
OPTS=(-o workers=64 -o fetch_threads=16 -o streams=4)
python3 -c "from pathlib import Path; from tests.bench.throughput import GiB, make_source; make_source(Path('/dev/shm/src'), int($SIZE * GiB), 16)"
bench() { python3 -m tests.bench.throughput --size-gb "$SIZE" --files 16 --source-dir /dev/shm/src "${OPTS[@]}" "$@"; }
for config in $CONFIGS; do
  case $config in
    tmpfs-8) echo "== tmpfs cache, 8 readers"; bench --readers 8 --pattern split --mmap --cache-dir /dev/shm/cache --chunk-sizes 4M,16M ;;
    tmpfs-1) echo "== tmpfs cache, 1 reader"; bench --readers 1 --mmap --cache-dir /dev/shm/cache ;;
    disk-8) echo "== disk cache, 8 readers"; bench --readers 8 --pattern split --mmap --cache-dir /var/tmp/fccache ;;
    fetch-ahead)  # the same readers with fetch-ahead off, then on (its default), back to back
      for ahead in 0 8M; do
        echo "== tmpfs cache, 8 readers, sequential_window=$ahead"
        bench --readers 8 --pattern split --mmap --cache-dir /dev/shm/cache --chunk-sizes 4M,16M -o sequential_window=$ahead
      done ;;
  esac
done
for pass in cold warm; do
[[ $CONFIGS == *" profile "* && $pass == cold || $CONFIGS == *" profile-warm "* && $pass == warm ]] || continue
echo "== profile: 8 readers, $pass, tmpfs cache"
mkdir -p /tmp/pmnt; rm -rf /dev/shm/pcache
fusecache() { python3 -m fusecache "$@"; }
fusecache mount /dev/shm/src /tmp/pmnt --cache-dir /dev/shm/pcache "${OPTS[@]}"
if [[ $pass == warm ]]; then  # fill the cache, then profile a restart over it
  fusecache prefetch /tmp/pmnt --json > /dev/null; fusecache umount /tmp/pmnt
  fusecache mount /dev/shm/src /tmp/pmnt --cache-dir /dev/shm/pcache "${OPTS[@]}"
fi
pid=$(fusecache status /tmp/pmnt --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
threads_cpu() { for t in /proc/$pid/task/*; do echo "$(basename $t) $(cut -d' ' -f14,15 $t/stat)"; done; }
sync; echo 3 > /proc/sys/vm/drop_caches
threads_cpu > "$OUT/threads-before.txt"
py-spy record -p "$pid" -o "$OUT/profile.txt" -f raw -r 200 --nonblocking --threads -d 120 > "$OUT/py-spy.log" 2>&1 & spy=$!
python3 -c "from pathlib import Path; from tests.bench.throughput import read_all; print(f'{read_all(sorted(Path(\"/tmp/pmnt\").glob(\"*.safetensors\")), 8, \"split\", True):.2f} GB/s $pass under py-spy')"
threads_cpu > "$OUT/threads-after.txt"
kill -INT $spy; wait $spy || true
fusecache umount /tmp/pmnt
python3 - "$OUT" "$pid" <<'PY'
import collections, sys
out, pid = sys.argv[1], sys.argv[2]
before = {l.split()[0]: list(map(int, l.split()[1:])) for l in open(f"{out}/threads-before.txt")}
after = {l.split()[0]: list(map(int, l.split()[1:])) for l in open(f"{out}/threads-after.txt")}
main = [a - b for a, b in zip(after.get(pid, [0, 0]), before.get(pid, [0, 0]))]
rest = [sum(after[t][i] - before.get(t, [0, 0])[i] for t in after if t != pid) for i in (0, 1)]
print(f"daemon CPU ticks (user, sys): trio thread {main}, worker threads {rest}")
leaves = {"all threads": collections.Counter(), "trio thread": collections.Counter()}
for line in open(f"{out}/profile.txt"):
    stack, _, n = line.rstrip().rpartition(" ")
    leaf = stack.split(";")[-1][:100]
    leaves["all threads"][leaf] += int(n)
    if "_thread_cache.py" not in stack:  # worker threads run from trio's thread cache
        leaves["trio thread"][leaf] += int(n)
for name, counter in leaves.items():
    total = sum(counter.values()) or 1
    print(f"-- {name}: leaf functions, share of samples")
    for leaf, n in counter.most_common(12):
        print(f"{100 * n / total:5.1f}%  {leaf}")
PY
done
if [[ $CONFIGS == *" passthrough "* ]]; then
  # The ceiling of a pyfuse3 daemon on this machine: pyfuse3's own example pass-through
  # filesystem (no cache, reads in the event loop), same readers, same kernel tuning.
  echo "== pyfuse3 passthroughfs example, 8 readers"
  mkdir -p /tmp/ptmnt
  python3 .device/passthroughfs.py /dev/shm/src /tmp/ptmnt > "$OUT/passthrough.log" 2>&1 & ptpid=$!
  for _ in $(seq 100); do mountpoint -q /tmp/ptmnt && break; sleep 0.1; done
  python3 -c "from fusecache import mounts; mounts.tune_fuse_mount('/tmp/ptmnt', 16384, 64)"
  sync; echo 3 > /proc/sys/vm/drop_caches
  python3 -c "from pathlib import Path; from tests.bench.throughput import read_all; print(f'{read_all(sorted(Path(\"/tmp/ptmnt\").glob(\"*.safetensors\")), 8, \"split\", True):.2f} GB/s through passthroughfs')"
  fusermount3 -u /tmp/ptmnt; wait $ptpid || true
fi
