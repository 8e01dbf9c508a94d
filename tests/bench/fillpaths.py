"""Fill-path candidates for issue 20 (one copy per byte filled), side by side:

    python3 tests/bench/fillpaths.py SOURCE_DIR SCRATCH_DIR THREADS ROUNDS [MODE,MODE...]

Source files -> cache files (in SCRATCH_DIR, removed after each variant), THREADS threads taking
16 MiB runs from one queue across all files, each run hashed (xxh3-64 per 4 MiB chunk).
  pwrite   read into a buffer, pwrite into the cache file, hash the buffer (today)
  mmapfa   posix_fallocate the run, read the source straight into a shared mapping, hash the mapping
  mmap     the same without fallocate (pages allocated at fault)
  cfr      copy_file_range source -> cache file, hash from a mapping of the cache file
  cfronly  copy_file_range alone, no hash (what `cp` does)
  steps    256 KiB at a time: pread into a small buffer, hash it, pwrite it
Prints GB/s and process CPU-s per GB for each, alternating variants over rounds."""
import mmap, os, resource, sys, threading, time
import xxhash
h = xxhash.xxh3_64_intdigest
MiB = 1 << 20
CHUNK, RUN, STEP = 4 * MiB, 16 * MiB, 256 * 1024
src_dir, dst_dir, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = sorted(os.listdir(src_dir))
def one(mode):
    os.makedirs(dst_dir, exist_ok=True)
    files = []
    for n in names:
        s = os.open(os.path.join(src_dir, n), os.O_RDONLY); size = os.fstat(s).st_size
        d = os.open(os.path.join(dst_dir, n), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600); os.ftruncate(d, size)
        mapped = mode not in ("pwrite", "steps")
        m = mmap.mmap(d, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) if mapped else None
        files.append((s, d, size, m))
    queue = [(f, off) for off in range(0, max(f[2] for f in files), RUN) for f in files if off < f[2]]
    queue.reverse(); lock = threading.Lock(); total = sum(f[2] for f in files)
    def worker():
        buf = memoryview(bytearray(RUN))
        while True:
            with lock:
                if not queue: return
                (s, d, size, m), off = queue.pop()
            n = min(RUN, size - off)
            if mode == "steps":
                v = buf[:STEP]; hasher = None
                for o in range(0, n, STEP):
                    if o % CHUNK == 0:
                        hasher = xxhash.xxh3_64()
                    part = v[:min(STEP, n - o)]; os.preadv(s, [part], off + o)
                    hasher.update(part); os.pwrite(d, part, off + o)
                continue
            if mode == "pwrite":
                v = buf[:n]; os.preadv(s, [v], off); o = 0
                while o < n: o += os.pwrite(d, v[o:], off + o)
                target = v
            elif mode in ("mmap", "mmapfa"):
                if mode == "mmapfa": os.posix_fallocate(d, off, n)
                target = memoryview(m)[off:off + n]; os.preadv(s, [target], off)
            else:
                o = 0
                while o < n: o += os.copy_file_range(s, d, n - o, off + o, off + o)
                target = memoryview(m)[off:off + n]
            if mode == "cfronly":
                target.release(); continue
            for c in range(0, n, CHUNK): h(target[c:c + CHUNK])
            if mode != "pwrite": target.release()
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    [x.start() for x in ts]; [x.join() for x in ts]
    dt = time.monotonic() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    for s, d, size, m in files:
        if m: m.close()
        os.close(s); os.close(d)
    for n in names: os.unlink(os.path.join(dst_dir, n))
    return total / dt / 1e9, cpu / (total / 1e9)
modes = sys.argv[5].split(",") if len(sys.argv) > 5 else ["pwrite", "mmapfa", "mmap", "cfr", "cfronly", "steps"]
for r in range(rounds):
    for mode in (modes if r % 2 == 0 else modes[::-1]):
        rate, cpu = one(mode)
        print(f"round {r+1} threads={threads} {mode:7s}: {rate:6.2f} GB/s  {cpu:5.2f} CPU-s/GB", flush=True)
