#!/usr/bin/env bash
# One sequential reader (dd, 1 MiB reads) of a 512 MiB file that no readahead stream covers
# (not a checkpoint shard), over the throttled remote filesystem (../shared/netfs.sh, 2 Gbit/s),
# with sequential_window off and on, alternating for ROUNDS rounds. As root, from the repository root:
#   flock /tmp/fusecache-bench.lock bash tests/bench/fetch_ahead_remote.sh [ROUNDS=2]
set -euo pipefail
ROUNDS=${1:-2}
NETFS=${NETFS:-../shared/netfs.sh}
FILE=/srv/netfs-export/fa/big.dat MNT=/tmp/fa-mnt CACHE=/tmp/fa-cache
cleanup() { fusecache umount "$MNT" 2>/dev/null || true; bash "$NETFS" down >/dev/null; rm -rf "$CACHE" "$(dirname "$FILE")"; }
trap cleanup EXIT
bash "$NETFS" up 2gbit >/dev/null
mkdir -p "$(dirname "$FILE")" "$MNT"
head -c 512M /dev/urandom > "$FILE"
for _ in $(seq "$ROUNDS"); do
  for ahead in 0 8M; do
    rm -rf "$CACHE"; sync; echo 3 > /proc/sys/vm/drop_caches
    cat "$FILE" > /dev/null  # the server's page cache stays warm: the link is the bottleneck
    fusecache mount /mnt/netfs "$MNT" --cache-dir "$CACHE" -o sequential_window=$ahead
    start=$(date +%s.%N); dd if="$MNT/fa/big.dat" of=/dev/null bs=1M 2>/dev/null; end=$(date +%s.%N)
    python3 -c "print(f'sequential_window=$ahead: {$end - $start:.2f} s, {512 / 1024 / ($end - $start):.3f} GiB/s')"
    fusecache umount "$MNT"
  done
done
