"""Loading a safetensors checkpoint from a shaped remote filesystem with N local ranks:
direct access, the engines' prefetch, rclone and fusecache side by side, in one run.

    flock /tmp/fusecache-bench.lock python3 -m tests.bench.netbench [--size 1G] [--ranks 4]
        [--rate 2gbit] [--cap 512M] [--systems direct,prefetch,rclone,fusecache]
        [--scenarios cold,warm,cold-capped,restart,tp-cold-capped] [--docs docs]

Testbed (netbed.py): sshd in a network namespace, a veth pair shaped with tc tbf to --rate,
an sshfs mount (kernel_cache) of the export on the host. The export's own page cache is kept
warm, so the link is the bottleneck, not the disk behind the server.

Every scenario starts N rank processes (netrank.py) that load the checkpoint with safe_open
(mmap) in their own order and check their digest against the source's. Measured: wall time
from the ranks' start signal to the last rank's exit; bytes that crossed the link (veth
counters, both directions, until the link is quiet again); amplification = link bytes /
checkpoint bytes; the daemon's peak RSS and CPU seconds; the machine's CPU seconds. "One
link pass" is a single sequential read of the checkpoint through sshfs, measured in the same
run, the floor for any cold load.

Needs root, /dev/fuse, sshfs, openssh-server, rclone, iproute2 and a memory cgroup
controller. Everything it builds (mounts, daemons, namespace, veth, cgroups) is removed on
every exit path, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fusecache import __version__
from fusecache.checkpoint import write_checkpoint
from fusecache.config import parse_size
from tests.bench import netreport
from tests.bench.memcg import CgroupError, MemoryCgroup
from tests.bench.netbed import Testbed, TestbedError, unmount
from tests.bench.netload import digest
from tests.bench.netsystems import SYSTEM_NAMES, System, make_systems

log = logging.getLogger("netbench")

MiB = 1 << 20
GiB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[2]
CGROUP_PREFIX = "fcnetbench-"


@dataclass(frozen=True)
class Scenario:
    name: str
    start: str  # "fresh": empty caches; "keep": right after a full uncapped load; "restart"
    capped: bool
    layout: str
    description: str


SCENARIOS = {s.name: s for s in (
    Scenario("cold", "fresh", False, "dp", "empty caches, ample memory"),
    Scenario("warm", "keep", False, "dp", "again, right after `cold`: everything cached"),
    Scenario("cold-capped", "fresh", True, "dp", "empty caches, ranks in the memory-capped cgroup"),
    Scenario("restart", "restart", True, "dp",
             "after a complete load: daemon restarted on its full cache, page cache dropped, ranks capped"),
    Scenario("tp-cold-capped", "fresh", True, "tp",
             "tensor parallel: each rank loads its 1/N slice of every tensor; empty caches, capped"),
)}


# ---- process and link figures ------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5\n")  # 5: reset the peak RSS (VmHWM)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_link_quiet(testbed: Testbed, quiet_s: float = 1.0, limit_s: float = 30.0) -> int:
    """Link bytes once nothing has crossed for quiet_s: readahead a system started during the
    load counts against it even if it finishes after the ranks."""
    deadline = time.monotonic() + limit_s
    last, since = testbed.link_bytes(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = testbed.link_bytes()
        if now - last > 64 * 1024:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return testbed.link_bytes()


def evict_page_cache(*roots: Path) -> None:
    """Drop the clean page cache of every file under roots (targeted drop_caches): the remote
    mount's pages and a daemon's cache files, but not the server's copy of the export."""
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def read_sequentially(paths: list[Path]) -> int:
    buf = bytearray(16 * MiB)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


# ---- ranks -------------------------------------------------------------------------------

class Ranks:
    """N rank processes, started and waiting at the ready/go handshake; killed on exit."""

    def __init__(self, directory: Path, world: int, layout: str, prefetch_threads: int,
                 cgroup: MemoryCgroup | None, log_path: Path) -> None:
        self.commands = []
        for rank in range(world):
            cmd = [sys.executable, "-m", "tests.bench.netrank", str(directory), "--rank", str(rank),
                   "--world", str(world), "--layout", layout, "--prefetch-threads", str(prefetch_threads)]
            self.commands.append(cmd + (["--cgroup-procs", str(cgroup.procs)] if cgroup else []))
        self.log_path = log_path
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Ranks:
        try:
            with open(self.log_path, "a") as log_file:
                for cmd in self.commands:
                    self.procs.append(subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                        start_new_session=True, cwd=REPO))
            for proc in self.procs:
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a rank failed to start; see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.close()

    def wait(self, timeout: float) -> list[dict]:
        """Each rank's result ({"digest", "seconds"} or {"error"}), waiting at most timeout."""
        deadline = time.monotonic() + timeout
        results = []
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                results.append({"error": "timeout"})
                continue
            line = proc.stdout.readline()
            results.append(json.loads(line) if proc.returncode == 0 and line
                           else {"error": f"exit status {proc.returncode}"})
        return results


# ---- the benchmark ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, testbed: Testbed, checkpoint_bytes: int) -> None:
        self.args = args
        self.testbed = testbed
        self.checkpoint_bytes = checkpoint_bytes
        self.remote_model = testbed.mountpoint / "model"
        export_model = testbed.export / "model"
        log.info("computing the source's digests")
        self.expected = {"dp": [digest(export_model, 0, args.ranks, "dp")] * args.ranks,
                         "tp": [digest(export_model, r, args.ranks, "tp") for r in range(args.ranks)]}

    def link_pass(self) -> dict:
        """One sequential read of the checkpoint through sshfs, the fastest of two."""
        passes = []
        for _ in range(2):
            evict_page_cache(self.remote_model)
            bytes0, started = self.testbed.link_bytes(), time.monotonic()
            read_sequentially(sorted(self.remote_model.iterdir()))
            seconds = time.monotonic() - started
            passes.append({"seconds": seconds, "link_bytes": self.testbed.link_bytes() - bytes0})
        best = min(passes, key=lambda p: p["seconds"])
        best["overhead"] = best["link_bytes"] / self.checkpoint_bytes
        best["gbit_s"] = self.checkpoint_bytes * 8 / best["seconds"] / 1e9
        log.info("one link pass: %.2f s (%.2f Gbit/s of checkpoint, link bytes %.3fx)",
                 best["seconds"], best["gbit_s"], best["overhead"])
        return best

    def run_system(self, system: System) -> list[dict]:
        rows = []
        state = {"warm": False, "cache_full": False}
        try:
            for name in self.args.scenarios:
                scenario = SCENARIOS[name]
                self._prepare(system, scenario, state)
                row = self._measure(system, scenario)
                rows.append(row)
                log.info("%-9s %-15s %6.1f s  amplification %.3f  %s", system.name, name, row["wall_s"],
                         row["amplification"], "ok" if row["ok"] else f"FAILED: {row['errors']}")
                state["warm"] = row["ok"] and not scenario.capped
                state["cache_full"] = state["cache_full"] or row["ok"]
        finally:
            system.stop()
            for directory in system.cache_dirs():
                shutil.rmtree(directory, ignore_errors=True)
        return rows

    def _prepare(self, system: System, scenario: Scenario, state: dict) -> None:
        """Bring the system into the state the scenario starts from."""
        needs_fill = (scenario.start == "keep" and not state["warm"]) or \
                     (scenario.start == "restart" and not state["cache_full"])
        if scenario.start == "fresh" or needs_fill:
            system.stop()
            system.start(fresh=True)
            evict_page_cache(self.remote_model)
            state.update(warm=False, cache_full=False)
        if needs_fill:
            self._fill(system)
            state.update(warm=True, cache_full=True)
        if scenario.start == "restart":
            system.stop()
            evict_page_cache(self.remote_model, *system.cache_dirs())
            system.start(fresh=False)

    def _fill(self, system: System) -> None:
        """An untimed uncapped load, for a `warm` or `restart` scenario run without the
        scenario that normally precedes it."""
        with self._ranks(system, "dp", capped=False) as (ranks, _cgroup):
            ranks.go()
            results = ranks.wait(self.args.run_timeout)
        if any(res.get("digest") != self.expected["dp"][0] for res in results):
            log.warning("the load that fills %s's caches failed: %s", system.name, results)

    def _measure(self, system: System, scenario: Scenario) -> dict:
        pid = system.daemon_pid()
        with self._ranks(system, scenario.layout, scenario.capped) as (ranks, cgroup):
            if pid:
                reset_peak_rss(pid)
            counters_before = system.counters()  # outside the measured interval: it runs a client
            before = Snapshot.take(self.testbed, pid)
            ranks.go()
            results = ranks.wait(self.args.run_timeout)
            wall, link_at_exit = time.monotonic() - before.time, self.testbed.link_bytes()
            wait_link_quiet(self.testbed)
            after = Snapshot.take(self.testbed, pid)
            counters_after = system.counters()
            rss = peak_rss(pid) if pid else None
            cgroup_peak, oom_kills = (cgroup.peak(), cgroup.oom_kills()) if cgroup else (None, 0)
        errors = [f"rank {r}: {res.get('error', 'wrong digest')}" for r, res in enumerate(results)
                  if res.get("digest") != self.expected[scenario.layout][r]]
        link = after.link - before.link
        return {
            "system": system.name, "scenario": scenario.name, "start": scenario.start, "capped": scenario.capped,
            "layout": scenario.layout, "ok": not errors, "errors": errors,
            "wall_s": wall, "rank_s": [res.get("seconds") for res in results],
            "link_bytes": link, "link_bytes_at_exit": link_at_exit - before.link,
            "amplification": link / self.checkpoint_bytes,
            "daemon_peak_rss": rss,
            "daemon_cpu_s": None if pid is None else after.daemon_cpu - before.daemon_cpu,
            "transport_cpu_s": after.transport_cpu - before.transport_cpu,
            "machine_cpu_s": after.machine_cpu - before.machine_cpu,
            "cgroup_peak": cgroup_peak, "oom_kills": oom_kills,
            "counters": {k: counters_after[k] - counters_before[k] for k in counters_after},
        }

    @contextmanager
    def _ranks(self, system: System, layout: str, capped: bool) -> Iterator[tuple[Ranks, MemoryCgroup | None]]:
        """The ranks, ready to go, in a fresh capped cgroup if asked; all gone on exit."""
        cgroup = MemoryCgroup(f"{CGROUP_PREFIX}{os.getpid()}", self.args.cap) if capped else None
        with cgroup or nullcontext(), Ranks(system.mountpoint / "model", self.args.ranks, layout,
                                            system.prefetch_threads, cgroup, self.testbed.state / "ranks.log") as ranks:
            yield ranks, cgroup


@dataclass(frozen=True)
class Snapshot:
    """The counters a measurement is the difference of."""

    time: float
    link: int
    machine_cpu: float
    transport_cpu: float
    daemon_cpu: float

    @classmethod
    def take(cls, testbed: Testbed, daemon_pid: int | None) -> Snapshot:
        return cls(time=time.monotonic(), link=testbed.link_bytes(), machine_cpu=machine_cpu_seconds(),
                   transport_cpu=cpu_seconds(testbed.transport_pids()),
                   daemon_cpu=cpu_seconds([daemon_pid]) if daemon_pid else 0.0)


# ---- set-up --------------------------------------------------------------------------------

def ensure_checkpoint(directory: Path, size: int, shard_count: int, seed: int) -> int:
    """Write the checkpoint unless the same one is already there; return its size in bytes."""
    stamp = directory.parent / "checkpoint.json"
    wanted = {"size": size, "shards": shard_count, "seed": seed, "max_tensor": 50 * MiB}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted and directory.is_dir()):
        log.info("writing a %.2f GiB checkpoint in %d shards to %s", size / GiB, shard_count, directory)
        shutil.rmtree(directory, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        write_checkpoint(directory, size, shards=shard_count, seed=seed, min_tensor=1 * MiB, max_tensor=50 * MiB)
        stamp.write_text(json.dumps(wanted))
    # The server's page cache holds the export: the link, not the disk behind it, is measured.
    read_sequentially(sorted(directory.iterdir()))
    return sum(p.stat().st_size for p in directory.iterdir())


def environment() -> dict:
    def version(name: str, *cmd: str) -> str:
        """The line of a tool's version output that names it (sshfs prints fusermount's first)."""
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
        except OSError:
            return "?"
        lines = (out.stdout + out.stderr).splitlines()
        return next((line.strip() for line in lines if name.lower() in line.lower()), "?")

    def source_state() -> str:
        """The commit the fusecache code under test comes from, flagged if it has local edits."""
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        edited = subprocess.run([*git, "status", "--porcelain", "src/fusecache"], capture_output=True, text=True).stdout
        return f"{commit or '?'}{' with uncommitted changes in src/fusecache/' if edited.strip() else ''}"

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "kernel": platform.release(),
            "cpus": os.cpu_count(), "memory_gib": round(memory / GiB, 1), "fusecache": f"{__version__} ({source_state()})",
            "rclone": version("rclone", "rclone", "version"), "sshfs": version("sshfs", "sshfs", "--version"),
            "ssh": version("openssh", "ssh", "-V")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="checkpoint size (default 1G)")
    parser.add_argument("--shards", type=int, default=8, help="checkpoint shards (default 8)")
    parser.add_argument("--ranks", type=int, default=4, help="rank processes (default 4)")
    parser.add_argument("--rate", default="2gbit", help="link rate, tc syntax (default 2gbit)")
    parser.add_argument("--cap", default="512M", help="memory cap of the ranks' cgroup (default 512M)")
    parser.add_argument("--systems", default=",".join(SYSTEM_NAMES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0, help="checkpoint contents")
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds one load may take")
    parser.add_argument("-o", dest="fusecache_options", action="append", default=[],
                        help="fusecache mount option (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/fcbench-net"),
                        help="checkpoint, caches and mounts (local disk)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--docs", type=Path, help="publish: DOCS/bench-net.json, bench-net.png and the "
                                                   "generated part of DOCS/benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.size_bytes, args.cap = parse_size(args.size), parse_size(args.cap)
    args.systems = args.systems.split(",")
    args.scenarios = args.scenarios.split(",")
    for value, known, what in ((args.systems, SYSTEM_NAMES, "system"), (args.scenarios, SCENARIOS, "scenario")):
        unknown = set(value) - set(known)
        if unknown:
            parser.error(f"unknown {what}(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """First SIGINT/SIGTERM/SIGHUP: unwind (which cleans up); later ones must not cut the
    cleanup short, so they are ignored from now on."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> dict:
    work = args.work
    if any(SCENARIOS[name].capped for name in args.scenarios):
        MemoryCgroup.remove_stale(CGROUP_PREFIX)  # also fails now if there is no memory controller
    for mountpoint in sorted((work / "mnt").glob("*")):
        unmount(mountpoint)  # left by a run that was SIGKILLed (its daemons exit with them)
    (work / "state").mkdir(parents=True, exist_ok=True)
    checkpoint_bytes = ensure_checkpoint(work / "export" / "model", args.size_bytes, args.shards, args.seed)
    with Testbed(export=work / "export", mountpoint=work / "mnt" / "remote", state=work / "state",
                 rate=args.rate) as testbed:
        bench = Bench(args, testbed, checkpoint_bytes)
        link_pass = bench.link_pass()
        rows = []
        for system in make_systems(args.systems, testbed.mountpoint, work, args.fusecache_options):
            rows += bench.run_system(system)
    return {"command": "python3 -m tests.bench.netbench " + " ".join(args.argv),
            "config": {"checkpoint_bytes": checkpoint_bytes, "shards": args.shards, "ranks": args.ranks,
                       "rate": args.rate, "cap_bytes": args.cap, "seed": args.seed,
                       "fusecache_options": args.fusecache_options,
                       "scenarios": {n: SCENARIOS[n].description for n in args.scenarios}},
            "environment": environment(), "link_pass": link_pass, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("netbench needs root (namespaces, mounts, cgroups)")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted; mounts, daemons, namespace and cgroups were removed", file=sys.stderr)
        return 130
    except (TestbedError, CgroupError) as e:
        print(f"netbench: {e}", file=sys.stderr)
        return 1
    results["elapsed_s"] = time.monotonic() - started
    print(netreport.table(results))
    print(netreport.verdicts(results))
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.docs:
        netreport.publish(results, args.docs)
    return 0 if all(row["ok"] for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
