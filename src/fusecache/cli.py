"""The `fusecache` command: mount, umount, status, prefetch, demo.

Also accepts the form mount.fuse3 uses for `mount -t fuse.fusecache` and fstab:
`fusecache SOURCE MOUNTPOINT -o key=value,flag`. Every failure is one line on stderr and a
non-zero exit: 2 for malformed usage, 1 for everything else. Paths from the daemon or the
source are printed escaped (see `printable`), since they are anyone's file names.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import __version__, control, logs, mounts, precheck, private, sdnotify, supervisor
from .logs import printable
from .precheck import MountError
from .config import LOG_LEVELS, ConfigError, build_config, human
from .session.mount import connected
from .livestate import formats_read

log = logging.getLogger(__name__)

COMMANDS = ("mount", "umount", "unmount", "restart", "status", "prefetch", "pin", "unpin", "cache", "demo")
DAEMON_COMMANDS = ("mount", "restart")  # the commands that become (or fork) a daemon
# the commands that act on daemons' replies
ASKING_COMMANDS = ("umount", "unmount", "restart", "status", "prefetch", "pin", "unpin", "cache")
FSTYPE = precheck.FUSECACHE_FSTYPE
UMOUNT_WAIT = 30.0
RESTART_WAIT = 120.0  # a daemon restarting in place loads its store again before it answers
PROGRESS_INTERVAL = 0.5  # seconds between redraws of a prefetch's progress bar
STATUS_TIMEOUT = 10.0  # a status answer takes milliseconds; silence this long is a hung daemon


class UsageError(Exception):
    """Malformed command line (exit status 2)."""


class Failure(Exception):
    """The command could not do its job (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusecache", description="Read-only FUSE cache for model checkpoints "
                                                   "on network filesystems.")
    parser.add_argument("--version", action="version", version=f"fusecache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT through the cache")
    _add_mount_arguments(mount)

    umount = sub.add_parser("umount", aliases=["unmount"], help="unmount a fusecache mount")
    umount.add_argument("mountpoint")

    restart = sub.add_parser("restart", help="restart the daemon of a mount from the fusecache installed now, "
                                             "keeping the mount, its open files and its cache")
    restart.add_argument("mountpoint")

    status = sub.add_parser("status", help="show cache and traffic figures of a mount")
    status.add_argument("mountpoint", nargs="?")
    status.add_argument("--json", action="store_true")

    prefetch = sub.add_parser("prefetch", help="fetch files or directories into the cache")
    prefetch.add_argument("paths", nargs="+", metavar="PATH")
    prefetch.add_argument("--no-wait", action="store_true", help="queue and return at once")
    prefetch.add_argument("--json", action="store_true")

    pin = sub.add_parser("pin", help="keep files or directories in the cache (never evicted), and fetch them")
    pin.add_argument("paths", nargs="+", metavar="PATH")
    unpin = sub.add_parser("unpin", help="let pinned paths be evicted again")
    unpin.add_argument("paths", nargs="+", metavar="PATH")

    cache = sub.add_parser("cache", help="list or clear what a mount has cached")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    cache_ls = cache_sub.add_parser("ls", help="list cached files")
    cache_ls.add_argument("mountpoint")
    cache_ls.add_argument("--json", action="store_true")
    cache_clear = cache_sub.add_parser("clear", help="evict files (all under each PATH) that are not open or pinned")
    cache_clear.add_argument("paths", nargs="+", metavar="PATH")

    demo = sub.add_parser("demo", help="generate a small checkpoint, load it through a mount, report")
    demo.add_argument("--workdir", help="where to put the demo tree (default: a temporary dir)")
    demo.add_argument("--size-mb", type=int, default=256, help="checkpoint size (default 256)")
    return parser


def _add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="comma-separated key=value options (see docs/operations.md)")
    parser.add_argument("--cache-dir", type=_path_argument)
    parser.add_argument("-f", "--foreground", action="store_true", default=None,
                        help="stay attached (for systemd Type=notify units)")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    # the supervisor's, for the daemon it execs to serve a mount whose daemon died (_exec_recovery)
    parser.add_argument("--recover-fd", type=int, help=argparse.SUPPRESS)


def _path_argument(text: str) -> Path:
    """A path given on the command line; Path("") would be the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    """The command line argv (sys.argv's by default). Only as a program (no argv given) does a
    daemon command exec itself onto the C allocator: a caller in process keeps its own."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
            argv.insert(0, "mount")  # mount.fuse3 form: fusecache SOURCE MOUNTPOINT -o ...
        args = _parser().parse_args(argv)
        args.argv = argv  # a daemon restarting in place runs its command line again
        command = args.command
        if as_program and args.command in DAEMON_COMMANDS:
            on_the_c_allocator(argv)
        status = COMMAND_HANDLERS[args.command](args)
        sys.stdout.flush()  # here, where a reader that left (`| head`) can be handled below
        return status
    except UsageError as e:
        say(str(e))
        return 2
    except (Failure, ConfigError, precheck.MountError, control.ControlError) as e:
        say(str(e))
        return 1
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        if command not in ASKING_COMMANDS:
            raise
        # a daemon's reply is input: another release's, or anyone's on a shared node
        say(f"the daemon's reply could not be read ({type(e).__name__}: {e}); is it another version of fusecache?")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Exit quietly with the status of a process killed by SIGPIPE. SIGPIPE itself stays
        # ignored (Python's default): the daemon is forked from this process and writes to
        # sockets whose peers may leave. stdout is pointed at /dev/null so that the flush at
        # exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def on_the_c_allocator(argv: list[str]) -> None:
    """Run this command again on the C allocator (PYTHONMALLOC=malloc), unless the environment
    names an allocator already, is ignored (`-E`, `-I`), or there is no interpreter to run (an
    embedding). The allocator is chosen as the interpreter starts, hence the exec, before
    anything is opened or locked. Why: the daemon's memory follows what the kernel holds
    (inodes.py), and freed memory goes back to the system only where the allocator can
    return it. pymalloc keeps each 1 MiB arena while any object in it lives, and objects
    allocated during a burst of 100,000 lookups (a timer's, a task's) keep a quarter of the
    burst's arenas after the kernel forgot it (RSS 1.5 times its start); glibc's malloc_trim
    returns each free page (linux.release_free_memory). The cost: some 16% more of the
    daemon's CPU per lookup (docs/benchmarks.md, "Inode memory")."""
    if "PYTHONMALLOC" in os.environ or sys.flags.ignore_environment or not sys.executable:
        return
    _run_again(argv, {"PYTHONMALLOC": "malloc"})


def _run_again(argv: list[str], env: dict[str, str]) -> NoReturn:
    """Exec `fusecache argv` from the fusecache installed now, in this process, with env added
    to the environment. `-P`: the current directory, perhaps anyone's, is not put on the
    module path."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-P", "-m", "fusecache", *argv], {**os.environ, **env})
    except OSError as e:  # the interpreter gone (upgraded): one line, and the exit status says so
        raise Failure(f"cannot run {sys.executable}: {e.strerror or e}") from None


def say(message: str) -> None:
    """One line on stderr, the form of every error and warning."""
    print(f"fusecache: {printable(message)}", file=sys.stderr)


def setup_logging(level: str, path: Path | None = None) -> None:
    """Log to path (rotated, private to us: logs.PrivateRotatingFileHandler), or to stderr."""
    handler: logging.Handler = logs.PrivateRotatingFileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---- mount -------------------------------------------------------------------------------

def cmd_mount(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args.source, args.mountpoint, args.options, cache_dir=args.cache_dir,
                           foreground=args.foreground, log_level=args.log_level)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.recover_fd is not None:
        return _serve_recovery(cfg, args.recover_fd)
    if not cfg.foreground:  # in the foreground the daemon logs them to stderr itself
        for message in cfg.deprecations:
            say(f"warning: {message}")
    setup_logging(cfg.log_level)
    if cfg.foreground:
        return _mount_in_foreground(cfg, args.argv)
    return _mount_detached(cfg, precheck.check_request(cfg))


def _mount_in_foreground(cfg, argv: list[str]) -> int:
    """Serve in this process (systemd runs it so). Started again by systemd after a crash, it
    serves the connection systemd's fd store kept, from the journal, instead of mounting:
    the checks of a new mount would touch the mountpoint, which waits on this very process.
    Asked to restart in place, it execs `argv` (this command line) once it stopped serving."""
    from . import daemon  # loaded (trio, the engine) only by the commands that start one
    stored = daemon.stored_connection(cfg)
    if stored is not None:
        recovering, fuse_fd = stored
        exec_fd = daemon.run(recovering, precheck.store_for(recovering), ready=lambda: None, recover_fd=fuse_fd)
    else:
        exec_fd = daemon.run(cfg, precheck.check_request(cfg), ready=precheck.release_claims)
    if exec_fd is not None:
        exec_in_place(argv, exec_fd)
    return 0


def exec_in_place(argv: list[str], fuse_fd: int) -> NoReturn:
    """Run this command line again, from the fusecache installed now, in this process (the
    pid systemd watches), with the FUSE connection at descriptor 3 named as systemd's fd store
    names it: the new program serves it from the journal (handover.py, "restarts in place").
    Nothing may write to descriptor 3 between the dup2 and the exec: no logging here."""
    log.info("exec of %s -m fusecache", sys.executable)
    logging.shutdown()
    if fuse_fd == sdnotify.LISTEN_FDS_START:
        os.set_inheritable(fuse_fd, True)
    else:
        os.dup2(fuse_fd, sdnotify.LISTEN_FDS_START)  # inheritable, whatever 3 held is closed
    _run_again(argv, {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": sdnotify.FUSE_FD_NAME})


def _mount_detached(cfg, store, takeover: bool = False) -> int:
    """Fork a daemon and return once it says the mount is live, or with its one-line error."""
    log_path = store.root / "daemon.log"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon, or its supervisor which starts it: never returns into the command
        status = 1
        try:
            os.close(read_end)
            precheck.release_claims()  # this command holds them until the mount is up
            if takeover or cfg.session != "kernel":  # a restart is adopted by the supervisor already there
                status = _daemon_child(cfg, store, write_end, log_path, takeover)
            else:
                status = _supervisor_child(cfg, store, write_end, log_path)
        except BaseException:  # reported by the child where it could; logged, never raised further
            log.exception("the daemon's start failed")
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    precheck.release_claims()  # mounted (the mount table refuses the next one), or failed
    if message == "ready":
        return 0
    os.waitpid(pid, 0)
    raise Failure(message or f"the daemon exited during start-up; see {log_path}")


def _supervisor_child(cfg, store, ready_fd: int, log_path: Path) -> int:
    """The supervisor (supervisor.py): starts the serving daemon, and a new one, recovering
    from the journal, whenever the one serving dies. Only the daemons it forks run trio."""
    try:
        _detach(log_path)
        setup_logging(cfg.log_level, log_path)
        # resolved now, while it can be: a daemon recovering the mount cannot stat it
        cfg = dataclasses.replace(cfg, mountpoint=Path(os.path.realpath(cfg.mountpoint)))
        control_path = control.socket_path(str(cfg.mountpoint), os.getuid())
        private.ensure_tree(control_path.parent.parent, control_path.parent)  # a runtime dir others can write
        listener = supervisor.listen(supervisor.socket_for(control_path))
    except Exception as e:  # noqa: BLE001 - the mounting command is told why, in one line
        log.error("%s", e)
        _tell_failure(ready_fd, e)
        return 1
    running: list[supervisor.Supervisor] = []

    def spawn(fuse_fd: int | None, ready: int | None, installed: bool = False) -> int:
        pid = os.fork()
        if pid == 0:
            listener.close()
            for s in running:
                s.close_in_child()
            _detach(log_path)
            if fuse_fd is not None and installed:
                _exec_recovery(cfg, fuse_fd)  # returns only where the fusecache installed now cannot run
            os._exit(_serve_detached(cfg, store, ready, log_path, takeover=False, recover_fd=fuse_fd))
        return pid

    first = spawn(None, ready_fd)
    os.close(ready_fd)  # the first daemon reports to the mounting command itself
    store.release_lock()  # the daemons hold it; a restarted one must be able to take it
    running.append(supervisor.Supervisor(listener, lambda fuse_fd, installed: spawn(fuse_fd, None, installed), first))
    return running[0].run()


def _detach(log_path: Path) -> None:
    """A new session, no terminal, stderr into the log, and / as the working directory (the
    one the command ran in must stay free to unmount; every path is absolute by now)."""
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    log_fd = private.open_file(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # it names files
    os.dup2(log_fd, 2)  # anything written to stderr (tracebacks, libfuse) lands in the log
    os.close(devnull)
    os.close(log_fd)
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGBUS, SIGABRT) leaves its stacks in the log


def _exec_recovery(cfg, fuse_fd: int) -> None:
    """In a child of the supervisor: become the daemon that serves the connection on fuse_fd
    from the journal, run from the fusecache installed now (`fusecache mount ... --recover-fd`).
    Why an exec: the supervisor lives as long as the mount, and after an upgrade its modules
    are the old release's; a daemon forked from it would import the new release's modules
    beside them. Returns (logged) only where that program cannot be run: the daemon then
    goes on from the supervisor's own modules, which is better than no daemon."""
    os.set_inheritable(fuse_fd, True)
    argv = ["mount", str(cfg.source), str(cfg.mountpoint), "--cache-dir", str(cfg.cache_dir),
            "--log-level", cfg.log_level, "--recover-fd", str(fuse_fd)]
    try:
        _run_again(argv + [arg for option in cfg.options for arg in ("-o", option)], {})
    except Failure as e:
        log.warning("%s: recovering the mount with the fusecache it was mounted with", e)
    os.set_inheritable(fuse_fd, False)


def _serve_recovery(cfg, fuse_fd: int) -> int:
    """The daemon _exec_recovery runs: detached by the supervisor's child already (stderr is
    the log); it serves the connection on fuse_fd from the journal. The descriptor must be a
    FUSE connection the kernel still holds (the option is the supervisor's, not a user's)."""
    try:
        is_fuse = os.fstat(fuse_fd).st_rdev == os.stat("/dev/fuse").st_rdev and connected(fuse_fd)
    except OSError:
        is_fuse = False
    if not is_fuse:
        raise Failure(f"--recover-fd {fuse_fd}: not a live FUSE connection (the option is fusecache's own)")
    store = precheck.store_for(cfg)
    faulthandler.enable()  # as _detach did before the exec: the exec turned it off
    return _serve_detached(cfg, store, None, store.root / "daemon.log", takeover=False, recover_fd=fuse_fd)


def _daemon_child(cfg, store, ready_fd: int | None, log_path: Path, takeover: bool) -> int:
    try:
        _detach(log_path)
    except Exception as e:  # noqa: BLE001 - a log file it may not use: the command is told
        _tell_failure(ready_fd, e)
        return 1
    return _serve_detached(cfg, store, ready_fd, log_path, takeover)


def _tell_failure(ready_fd: int | None, error: BaseException) -> None:
    """The first line of why the start failed, to the mounting command waiting on ready_fd."""
    if ready_fd is not None:
        os.write(ready_fd, str(error).splitlines()[0].encode() if str(error) else type(error).__name__.encode())


def _serve_detached(cfg, store, ready_fd: int | None, log_path: Path, takeover: bool,
                    recover_fd: int | None = None) -> int:
    """Serve as a detached daemon (stderr already the log). ready_fd: where to say "ready" or
    the start-up error (None: nobody waits, a recovery)."""
    setup_logging(cfg.log_level, log_path)
    if not takeover and recover_fd is None:  # a restarted daemon locks the store once the old one lets go
        store.record_owner(os.getpid())
    reported = ready_fd is None

    def ready() -> None:
        nonlocal reported
        if ready_fd is None:
            return
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        reported = True

    try:
        from . import daemon  # loaded (trio, the engine) only by the commands that start one
        daemon.run(cfg, store, ready, takeover, recover_fd)
        return 0
    except BaseException as e:  # the parent must hear about any start-up failure
        if recover_fd is not None and isinstance(e, MountError):
            log.error("%s", e)  # one line: why the mount ends (a journal refused)
            return supervisor.OTHER_RELEASE if isinstance(e, precheck.OtherRelease) else 1
        log.exception("daemon failed")
        if not reported:
            _tell_failure(ready_fd, e)
        return 1


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = mounts.resolve_mountpoint(args.mountpoint)
    try:  # _umount's own errors are Failures: an OSError here is the parent's
        with mounts.pinned(mountpoint) as pinned_path:
            return _umount(args, mountpoint, pinned_path)
    except FileNotFoundError:
        raise Failure(f"{args.mountpoint} is not a fusecache mount") from None
    except OSError as e:
        raise Failure(f"cannot unmount {args.mountpoint}: {e.strerror}") from None


def _umount(args: argparse.Namespace, mountpoint: str, pinned_path: str) -> int:
    info = mounts.find_mount(mountpoint)
    if info is None or info.fstype != FSTYPE:
        raise Failure(f"{args.mountpoint} is not a fusecache mount")
    silent: control.ControlTimeout | None = None
    pids: list[int] = []
    try:
        answer = control.call(mountpoint, {"command": "pid"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)
        pids = [pid for pid in (answer.get("pid"), answer.get("supervisor_pid")) if pid is not None]
        if not pids or not all(type(pid) is int and pid > 0 for pid in pids):  # a daemon's answer is input
            say(f"warning: the daemon of {args.mountpoint} gave no pid to wait for ({printable(str(pids)[:100])}): "
                "unmounting without waiting")
            pids = []
    except control.ControlTimeout as e:
        silent = e  # a stopped or hung daemon: unmounting needs nothing from it
    except control.ControlError:
        pass  # not ours to ask (or the daemon is gone): unmount without waiting
    try:
        mounts.unmount(mountpoint, pinned_path=pinned_path)
    except OSError as e:
        raise Failure(f"cannot unmount {args.mountpoint}: {e.strerror}") from None
    if silent is not None:
        say(f"{silent}; unmounted without waiting for it to exit")
        return 0
    # return only once the daemon is gone, so its cache dir is free for the next mount
    for pid in pids:  # the daemon, then its supervisor, which ends once the mount did
        if not mounts.wait_for_exit(pid, UMOUNT_WAIT):
            raise Failure(f"unmounted, but pid {pid} of the mount is still running after {UMOUNT_WAIT:.0f}s")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Start a daemon of the fusecache installed now that takes the mount over from the one
    serving it (handover.py): same source, cache and options; readers see a pause."""
    mountpoint = mounts.resolve_mountpoint(args.mountpoint)
    info = mounts.find_mount(mountpoint)
    if info is None or info.fstype != FSTYPE:
        raise Failure(f"{args.mountpoint} is not a fusecache mount")
    if info.owner_uid != os.getuid():  # its daemon's word (source, cache) would be served as ours
        raise Failure(f"{args.mountpoint} is uid {info.owner_uid}'s mount: only its owner restarts it")
    given = control.call(mountpoint, {"command": "mount_args"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)
    try:  # checked by this fusecache, which will serve them, before the daemon stops serving
        cfg = build_config(given["source"], mountpoint, given["options"], cache_dir=Path(given["cache_dir"]),
                           foreground=bool(given.get("in_place")), log_level=given["log_level"])
    except (ConfigError, KeyError, TypeError) as e:
        raise Failure(f"this fusecache cannot take the options of the running daemon: {e}") from None
    if given.get("in_place"):  # systemd runs it: the same process execs the fusecache installed now
        return _restart_in_place(mountpoint)
    setup_logging(cfg.log_level)
    store = precheck.store_for(cfg)
    return _mount_detached(cfg, store, takeover=True)


def _restart_in_place(mountpoint: str) -> int:
    """Ask the daemon to restart in place, and wait until the new program answers (the same
    pid: told apart by when its program started)."""
    before = control.call(mountpoint, {"command": "pid"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT).get("started")
    pid = control.call(mountpoint, {"command": "restart_in_place", **formats_read()}, timeout=STATUS_TIMEOUT)["pid"]
    deadline = time.monotonic() + RESTART_WAIT
    while time.monotonic() < deadline:
        try:
            if control.call(mountpoint, {"command": "pid"}, timeout=STATUS_TIMEOUT,
                            total=STATUS_TIMEOUT).get("started") != before:
                return 0
        except control.ControlError:
            pass  # the old program gone, the new one not answering yet
        time.sleep(0.1)
    raise Failure(f"the daemon (pid {pid}) did not serve again within {RESTART_WAIT:.0f}s after restarting in place; "
                  f"see its log")


# ---- status and prefetch -------------------------------------------------------------------

def fusecache_mounts() -> list[str]:
    return [m.mountpoint for m in mounts.mount_table() if m.fstype == FSTYPE]


def _locate(path: str) -> tuple[str, str]:
    """(mountpoint, path relative to it) of a path inside a fusecache mount: as given, or
    else with the symlinks on its way resolved (a mount reached through a link)."""
    mountpoints = fusecache_mounts()
    for absolute in (os.path.abspath(path), os.path.realpath(path)):
        inside = [mp for mp in mountpoints if absolute == mp or absolute.startswith(mp.rstrip("/") + "/")]
        if inside:
            best = max(inside, key=len)
            relpath = os.path.relpath(absolute, best)
            return best, "" if relpath == "." else relpath
    raise Failure(f"{path} is not inside a fusecache mount")


def cmd_status(args: argparse.Namespace) -> int:
    targets = [mounts.resolve_mountpoint(args.mountpoint)] if args.mountpoint else fusecache_mounts()
    if args.mountpoint and targets[0] not in fusecache_mounts():
        raise Failure(f"{args.mountpoint} is not a fusecache mount")
    if args.mountpoint:
        reports = [control.call(targets[0], {"command": "status"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)]
    else:  # every mount: one whose daemon does not answer (stopped, another user's) is said so, in turn
        reports = [_status_or_error(mp) for mp in targets]
    unanswered = any("error" in report for report in reports)
    if args.json:
        print(json.dumps(reports[0] if args.mountpoint else reports, indent=2))
        return 1 if unanswered else 0
    if not reports:
        print("no fusecache mounts")
    for report in reports:
        if "error" in report:
            say(f"{report['mountpoint']}: {report['error']}")
            continue
        try:
            _print_status(report)
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError):  # another fusecache's daemon, or anyone's
            print(f"  (the rest of this daemon's status could not be read: {printable(str(report)[:200])})")
    return 1 if unanswered else 0


def _status_or_error(mountpoint: str) -> dict:
    try:
        return control.call(mountpoint, {"command": "status"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)
    except control.ControlError as e:  # ControlTimeout too
        return {"mountpoint": mountpoint, "error": str(e)}


def _print_status(report: dict) -> None:
    """A daemon's status, as a user reads it. A daemon's answer is input (the user running
    it may not be the one asking): what it says is escaped, and a figure an older daemon does
    not report (it runs until restarted after an upgrade) counts 0."""
    m = collections.defaultdict(int, report["metrics"])
    hit = "n/a" if m["hit_ratio"] is None else f"{100 * m['hit_ratio']:.1f}%"
    print(f"{printable(report['mountpoint'])}  <-  {printable(report['source'])}  (pid {int(report['pid'])})")
    print(f"  cache:        {printable(report['cache'])}")
    print(f"  from source:  {human(m['bytes_from_source'])}  now {human(m['source_rate'])}/s")
    print(f"  served:       {human(m['bytes_served'])} by the daemon ({human(m['bytes_served_from_cache'])} from cache, "
          f"{human(m['bytes_served_direct'])} by its readers), "
          f"{human(m['passthrough_bytes'])} opened through passthrough")
    print(f"  hit ratio:    {hit}  errors: {int(m['fetch_errors'])}  checksum failures: {int(m['checksum_failures'])}")
    print(f"  filling:      {int(m['fill_reads'])} of {int(m['fill_reads_limit'])} stream reads in flight, "
          f"{human(m['fill_buffer_bytes'])} of buffers")
    print(f"  passthrough:  {printable(str(report.get('passthrough', '?')))}  "
          f"({int(m['passthrough_opens'])} opens served by the kernel from the cache)")
    if report.get("pending_bytes"):
        print(f"  pending:      {human(report['pending_bytes'])} of replaced files still open, freed at their last close")
    for f in report["files"]:
        fraction = f["cached"] / f["size"] if f["size"] else 1.0
        flag = " streaming" if f.get("streaming") else ""
        flag += f" passthrough x{int(f['passthrough'])}" if f.get("passthrough") else ""
        print(f"  {100 * fraction:5.1f}%  {human(f['size']):>10}  {printable(f['path'])}{flag}")


def cmd_prefetch(args: argparse.Namespace) -> int:
    results = []
    for mountpoint, relpaths in _by_mount(args.paths).items():
        queued = control.call(mountpoint, {"command": "prefetch", "paths": relpaths})
        if "job" not in queued:
            raise control.ControlError(f"the daemon of {mountpoint} runs an older fusecache: remount it")
        result = {"mountpoint": mountpoint, "files": queued["files"], "bytes": queued["bytes"]}
        if not args.no_wait:
            result.update(_wait_for(mountpoint, queued["job"], queued["bytes"], show=not args.json))
        results.append(result)
    if args.json:
        print(json.dumps(results, indent=2))
    failed = [r for r in results if r.get("errors")]
    for r in failed:
        for path, error in r["errors"].items():
            say(f"prefetch of {path} failed: {error}")
    return 1 if failed else 0


def _wait_for(mountpoint: str, job: int, total: int, show: bool) -> dict:
    """Ask the daemon until no file of the prefetch job is still being fetched, drawing a
    progress bar: each answer comes when the job ends or PROGRESS_INTERVAL has passed.
    `total` (the listed size) stands in until every file's current version is known. The job
    is asked for by its id: a request listing its paths would outgrow the request limit with
    a large tree."""
    started = time.monotonic()
    while True:
        progress = control.call(mountpoint, {"command": "progress", "job": job, "wait": PROGRESS_INTERVAL},
                                timeout=STATUS_TIMEOUT, total=PROGRESS_INTERVAL + STATUS_TIMEOUT)
        done, rate = progress["cached"], progress["rate"]
        if not progress["unknown"]:
            total = progress["size"]
        if show:
            eta = f"{max(total - done, 0) / rate:.0f}s" if rate > 0 else "--"
            width = 30
            filled = min(width, int(width * done / total)) if total else width
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {human(done)} / {human(total)}"
                  f"  {human(rate)}/s  ETA {eta}   ", end="", file=sys.stderr, flush=True)
        if not progress["pending"]:
            if show:
                print(file=sys.stderr)
            return {"cached": done, "bytes": total, "seconds": time.monotonic() - started,
                    "errors": progress["errors"]}
        if not progress.get("waited"):  # a daemon of an older fusecache answers at once
            time.sleep(PROGRESS_INTERVAL)


def _by_mount(paths: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path in paths:
        mountpoint, relpath = _locate(path)
        grouped.setdefault(mountpoint, []).append(relpath)
    return grouped


def cmd_pin(args: argparse.Namespace) -> int:
    for mountpoint, relpaths in _by_mount(args.paths).items():
        queued = control.call(mountpoint, {"command": "pin", "paths": relpaths})
        print(f"pinned {len(relpaths)} path(s) in {printable(mountpoint)}; fetching {queued['files']} file(s)")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    for mountpoint, relpaths in _by_mount(args.paths).items():
        control.call(mountpoint, {"command": "unpin", "paths": relpaths}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    if args.cache_command == "ls":
        mountpoint, _ = _locate(args.mountpoint)
        # answered from memory, as a status: a daemon sending heartbeats alone is given up on
        report = control.call(mountpoint, {"command": "cache_ls"}, timeout=STATUS_TIMEOUT, total=STATUS_TIMEOUT)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"{human(report['cache_bytes'])} of {human(report['cache_limit'])} used")
        for f in report["files"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["last_used"])) if f.get("last_used") else "-"
            flags = "pinned" if f["pinned"] else ""
            print(f"{human(f['cached']):>10} / {human(f['size']):>10}  {when}  {printable(f['path'])}  {flags}")
        return 0
    for mountpoint, relpaths in _by_mount(args.paths).items():
        result = control.call(mountpoint, {"command": "cache_clear", "paths": relpaths})
        print(f"{printable(mountpoint)}: evicted {len(result['evicted'])} file(s)")
        for path in result["kept"]:
            print(f"  kept {printable(path)} (open, streaming or pinned)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, args.size_mb)


COMMAND_HANDLERS = {"mount": cmd_mount, "umount": cmd_umount, "unmount": cmd_umount, "restart": cmd_restart,
                    "status": cmd_status, "prefetch": cmd_prefetch, "pin": cmd_pin, "unpin": cmd_unpin,
                    "cache": cmd_cache, "demo": cmd_demo}
