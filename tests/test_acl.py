"""fusecache.acl: parsing, evaluation and requester groups, in-process (no FUSE mount).

ACLs are written with os.setxattr from bytes encoded here (no setfacl needed), in tmp_path or,
where its filesystem has no ACLs, in /dev/shm. Creating files for other owners and running
the kernel cross-check as uid 65534 need root.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest

from fusecache import acl
from fusecache.acl import R, X, Acl, AclEntry, MalformedAcl, Tag, check

from .helpers import NOBODY, encode, entries, set_acl

OWNER = 1000
OWNING_GROUP = 1000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")


def make(directory: Path, name: str, text: str | None = None, *, is_dir: bool = False,
         owner: tuple[int, int] = (OWNER, OWNING_GROUP), mode: int | None = None) -> Path:
    path = directory / name
    if is_dir:
        path.mkdir()
        (path / "inside").touch()
    else:
        path.touch()
    os.chown(path, *owner)
    path.chmod(mode if mode is not None else 0o755 if is_dir else 0o644)
    if text is not None:
        set_acl(path, text)
    return path


def allowed(path: Path, uid: int, groups: set[int] | None, want: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return check(acl.read_access_acl(fd), os.fstat(fd), uid,
                     None if groups is None else frozenset(groups), want)
    finally:
        os.close(fd)


# --- parsing ---

@needs_root
def test_parse_round_trip(acl_dir):
    text = "u::rw-,u:0:r--,u:65534:---,g::r--,g:4242:rwx,m::r-x,o::r--"
    value = encode(entries(text))
    parsed = acl.parse_access_acl(value)
    assert parsed.entries == tuple(AclEntry(Tag(t), p, i) for t, p, i in entries(text))
    assert encode([(e.tag, e.perm, e.id) for e in parsed.entries]) == value
    assert hash(parsed) == hash(acl.parse_access_acl(value))

    path = make(acl_dir, "f", text)
    assert os.getxattr(path, acl.XATTR_ACCESS) == value  # the kernel keeps it as written
    fd = os.open(path, os.O_RDONLY)
    try:
        assert acl.read_access_acl(fd) == parsed
    finally:
        os.close(fd)
    assert acl.read_access_acl(str(path)) == parsed
    assert acl.read_access_acl(path) == parsed


@needs_root
def test_no_acl_is_none(acl_dir):
    plain = make(acl_dir, "plain")
    assert acl.read_access_acl(str(plain)) is None
    minimal = make(acl_dir, "minimal", "u::rw-,g::r--,o::---")  # the kernel only sets the mode
    assert acl.read_access_acl(str(minimal)) is None
    assert acl.parse_access_acl(encode(entries("u::rw-,g::r--,o::---"))).is_minimal
    (acl_dir / "link").symlink_to("minimal")
    assert acl.read_access_acl(str(acl_dir / "link")) is None
    assert acl.read_access_acl("/proc/self/status") is None  # a filesystem without ACLs


def test_other_errors_propagate(acl_dir):
    with pytest.raises(FileNotFoundError):
        acl.read_access_acl(str(acl_dir / "missing"))
    fd = os.open(acl_dir, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        acl.read_access_acl(fd)
    assert info.value.errno in (errno.EBADF, errno.ENOENT)  # read through /proc/self/fd


def test_read_through_an_o_path_descriptor(acl_dir):
    path = acl_dir / "f"
    path.write_bytes(b"x")
    os.setxattr(path, acl.XATTR_ACCESS, encode(entries("u::rw-,u:65534:---,g::r--,m::r--,o::r--")))
    fd = os.open(path, os.O_PATH)
    try:
        assert acl.read_access_acl(fd) == acl.parse_access_acl(os.getxattr(path, acl.XATTR_ACCESS))
    finally:
        os.close(fd)


@pytest.mark.parametrize("value, message", [
    (encode(entries("u::rw-,g::r--,o::r--"), version=1), "version 1"),
    (encode(entries("u::rw-,g::r--,o::r--"))[:-1], "bytes"),
    (b"\x02\x00", "bytes"),
    (encode([]), "OTHER"),
    (encode(entries("u::rw-,g::r--,o::r--")) + b"\x40\x00\x04\x00\xff\xff\xff\xff", "unknown tag 0x40"),
    (encode(entries("g::r--,o::r--")), "USER_OBJ must come"),
    (encode(entries("u::rw-,o::r--")), "GROUP_OBJ"),
    (encode(entries("u::rw-,g::r--")), "OTHER"),
    (encode(entries("u::rw-,u:65534:---,g::r--,o::r--")), "no MASK"),
    (encode(entries("u::rw-,g::r--,g:4242:r--,o::r--")), "no MASK"),
    (encode(entries("u::rw-,u::rw-,g::r--,o::r--")), "USER_OBJ where"),
    (encode(entries("u::rw-,g::r--,u:1:r--,m::r--,o::r--")), "USER where"),
    (encode(entries("u::rw-,g::r--,o::r--,m::r--")), "MASK where"),
    (encode(entries("u::rw-,g::r--,o::r--,o::r--")), "OTHER where"),
    (encode([(Tag.USER_OBJ, 8, None)] + entries("g::r--,o::r--")), "permission bits"),
    (encode(entries("u::rw-") + [(Tag.USER, 4, None)] + entries("g::r--,m::r--,o::r--")), "without an id"),
])
def test_malformed_rejected(value, message):
    with pytest.raises(MalformedAcl, match=message):
        acl.parse_access_acl(value)
    assert issubclass(MalformedAcl, ValueError)


# --- evaluation ---

@needs_root
def test_named_user_denied_on_0644_file(acl_dir):
    path = make(acl_dir, "f", "u::rw-,u:65534:---,g::r--,m::r--,o::r--")
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert not allowed(path, NOBODY, {NOBODY}, R)
    assert allowed(path, OWNER, {OWNING_GROUP}, R)
    assert allowed(path, 1001, {1001}, R)
    assert allowed(path, 1001, {OWNING_GROUP}, R)
    assert allowed(path, 0, {0}, R)


@needs_root
def test_named_user_grant_is_masked(acl_dir):
    masked = make(acl_dir, "masked", "u::rw-,u:1001:r--,g::---,m::--x,o::r--")
    assert not allowed(masked, 1001, {1001}, R)  # matches, masked: no fall through to OTHER
    granted = make(acl_dir, "granted", "u::rw-,u:1001:r--,g::---,m::r--,o::---")
    assert allowed(granted, 1001, {1001}, R)
    assert not allowed(granted, 1002, {1002}, R)
    # the owner is judged by USER_OBJ alone, whatever a USER entry for the same uid says
    assert not allowed(make(acl_dir, "own", "u::---,u:1000:r--,g::r--,m::r--,o::r--"), OWNER, {OWNER}, R)


@needs_root
def test_group_class_does_not_fall_through_to_other(acl_dir):
    path = make(acl_dir, "f", "u::rw-,g::---,g:2000:---,g:3000:r--,m::r--,o::r--")
    assert allowed(path, 1001, {1001}, R)  # no group entry matches: OTHER
    assert not allowed(path, 1001, {OWNING_GROUP}, R)  # GROUP_OBJ matches and denies
    assert not allowed(path, 1001, {2000}, R)  # ACL_GROUP matches and denies
    assert allowed(path, 1001, {2000, 3000}, R)  # one matching entry grants
    assert allowed(path, 1001, {OWNING_GROUP, 3000}, R)
    masked = make(acl_dir, "masked", "u::rw-,g::r--,g:3000:r--,m::--x,o::r--")
    assert not allowed(masked, 1001, {3000}, R)  # matches, granted only before the mask


@needs_root
def test_empty_mask_means_mode_bits(acl_dir):
    """Linux's generic_permission() skips the ACL when the group class grants nothing, so
    named entries get OTHER (POSIX.1e, and posix_acl_permission() alone, would deny)."""
    text = "u::rw-,u:1001:---,g::r--,g:3000:r--,m::---,o::r--"
    path = make(acl_dir, "f", text)
    assert os.stat(path).st_mode & 0o777 == 0o604
    assert allowed(path, 1001, {1001}, R)
    assert allowed(path, 1002, {3000}, R)
    assert not allowed(path, 1002, {OWNING_GROUP}, R)
    assert not acl.parse_access_acl(encode(entries(text))).permits(OWNER, OWNING_GROUP, 1001, frozenset({1001}), R)


@needs_root
def test_unknown_groups_get_the_worst_case(acl_dir):
    denying_group = make(acl_dir, "denying", "u::rw-,g::r--,g:2000:---,m::r--,o::r--")
    assert not allowed(denying_group, 1001, None, R)
    assert allowed(denying_group, OWNER, None, R)  # the owner's answer needs no groups
    assert allowed(make(acl_dir, "open", "u::rw-,g::r--,g:2000:r--,m::r--,o::r--"), 1001, None, R)
    assert not allowed(make(acl_dir, "closed", "u::rw-,g::r--,g:2000:r--,m::r--,o::---"), 1001, None, R)
    assert not allowed(make(acl_dir, "nomode", mode=0o604), 1001, None, R)


@needs_root
def test_root(acl_dir):
    nothing = "u::---,u:0:---,g::---,m::---,o::---"
    assert allowed(make(acl_dir, "f", nothing), 0, {0}, R)
    assert not allowed(make(acl_dir, "noexec", nothing), 0, {0}, X)
    assert allowed(make(acl_dir, "exec", "u::--x,u:0:---,g::---,m::---,o::---"), 0, {0}, X)
    directory = make(acl_dir, "d", nothing, is_dir=True)
    assert allowed(directory, 0, {0}, R)
    assert allowed(directory, 0, {0}, X)


def test_mode_bits_without_acl():
    st = os.stat_result((0o100640, 1, 1, 1, OWNER, OWNING_GROUP, 0, 0, 0, 0))
    assert check(None, st, OWNER, frozenset({OWNER}), R)
    assert check(None, st, 1001, frozenset({OWNING_GROUP}), R)
    assert not check(None, st, 1001, frozenset({1001}), R)
    assert not check(None, st, OWNER, frozenset({OWNER}), X)
    assert Acl.from_mode(0o100640).is_minimal


# --- requester groups ---

def test_requester_groups_of_this_process():
    expected = frozenset({os.getegid(), *os.getgroups()})
    assert acl.requester_groups(os.getpid(), os.getegid()) == expected
    seen = []
    thread = threading.Thread(target=lambda: seen.append(
        acl.requester_groups(threading.get_native_id(), os.getegid())))
    thread.start()
    thread.join()
    assert seen == [expected]  # FUSE sends thread ids
    assert acl.requester_groups(os.getpid(), os.getegid() + 1) is None  # not that requester


@needs_root
def test_requester_groups_of_another_process():
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([1111, 2222])
            os.setgid(3333)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert acl.requester_groups(pid, 3333) == {1111, 2222, 3333}
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_requester_groups_unknown_pid():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert acl.requester_groups(pid_max + 1, os.getegid()) is None
    assert acl.requester_groups(0, os.getegid()) is None  # outside our pid namespace


# --- against the kernel ---

def kernel_allows(directory: Path, name: str, groups: list[int], is_dir: bool, want: int) -> bool:
    """Whether the kernel lets a process of uid and gid 65534 in groups read (R) the file or
    directory, or search (X) the directory, reaching it from an fd of directory."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                if want == X:
                    os.stat(f"{name}/inside", dir_fd=dir_fd)
                else:
                    os.close(os.open(name, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0), dir_fd=dir_fd))
                status = 0
            except PermissionError:
                status = 1
        finally:
            os._exit(status)
    os.close(dir_fd)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    assert code in (0, 1), f"child failed ({code})"
    return code == 0


CROSS_CHECKS = [
    # name, ACL, owner, supplementary groups of uid 65534, directory?, want, expected
    ("named-deny", "u::rw-,u:65534:---,g::r--,m::r--,o::r--", (OWNER, OWNING_GROUP), [], False, R, False),
    ("named-grant", "u::rw-,u:65534:r--,g::---,m::r--,o::---", (OWNER, OWNING_GROUP), [], False, R, True),
    ("named-masked", "u::rw-,u:65534:r--,g::---,m::--x,o::r--", (OWNER, OWNING_GROUP), [], False, R, False),
    ("empty-mask-named", "u::rw-,u:65534:---,g::---,m::---,o::r--", (OWNER, OWNING_GROUP), [], False, R, True),
    ("empty-mask-group", "u::rw-,g::---,g:4242:---,m::---,o::r--", (OWNER, OWNING_GROUP), [4242], False, R, True),
    ("empty-mask-owning", "u::rw-,g::r--,g:4242:r--,m::---,o::r--", (OWNER, NOBODY), [], False, R, False),
    ("group-grant", "u::rw-,g::---,g:4242:r--,m::r--,o::---", (OWNER, OWNING_GROUP), [4242], False, R, True),
    ("group-deny", "u::rw-,g::r--,g:4242:---,m::r--,o::r--", (OWNER, OWNING_GROUP), [4242], False, R, False),
    ("no-group-match", "u::rw-,g::r--,g:4242:---,m::r--,o::r--", (OWNER, OWNING_GROUP), [], False, R, True),
    ("second-group", "u::rw-,g::---,g:4242:r--,m::r--,o::---", (OWNER, OWNING_GROUP), [1000, 4242], False, R, True),
    ("owning-group", "u::rw-,g::---,m::r--,o::r--", (OWNER, NOBODY), [], False, R, False),
    ("owner-obj-wins", "u::---,u:65534:r--,g::r--,m::r--,o::r--", (NOBODY, NOBODY), [], False, R, False),
    ("dir-search-denied", "u::rwx,u:65534:r--,g::r-x,m::r-x,o::r-x", (OWNER, OWNING_GROUP), [], True, X, False),
    ("dir-read", "u::rwx,u:65534:r--,g::r-x,m::r-x,o::r-x", (OWNER, OWNING_GROUP), [], True, R, True),
    ("dir-group-search", "u::rwx,g::---,g:4242:--x,m::--x,o::r-x", (OWNER, OWNING_GROUP), [4242], True, X, True),
    ("dir-group-read", "u::rwx,g::---,g:4242:--x,m::--x,o::r-x", (OWNER, OWNING_GROUP), [4242], True, R, False),
]


@needs_root
@pytest.mark.parametrize("name, text, owner, groups, is_dir, want, expected", CROSS_CHECKS,
                         ids=[case[0] for case in CROSS_CHECKS])
def test_agrees_with_kernel(acl_dir, name, text, owner, groups, is_dir, want, expected):
    path = make(acl_dir, name, text, is_dir=is_dir, owner=owner)
    assert acl.read_access_acl(str(path)) is not None
    ours = allowed(path, NOBODY, {NOBODY, *groups}, want)
    assert ours == kernel_allows(acl_dir, name, groups, is_dir, want)
    assert ours == expected


@needs_root
def test_agrees_with_kernel_on_random_acls(acl_dir):
    rng = random.Random(20240611)
    ids = [NOBODY, OWNER, 4242]
    for case in range(150):
        is_dir = rng.random() < 0.3
        named_users = sorted(rng.sample(ids, rng.randint(0, 2)))
        named_groups = sorted(rng.sample(ids, rng.randint(0, 2)))
        items = [(Tag.USER_OBJ, rng.randint(0, 7), None)]
        items += [(Tag.USER, rng.randint(0, 7), uid) for uid in named_users]
        items.append((Tag.GROUP_OBJ, rng.randint(0, 7), None))
        items += [(Tag.GROUP, rng.randint(0, 7), gid) for gid in named_groups]
        if named_users or named_groups or rng.random() < 0.5:
            items.append((Tag.MASK, rng.randint(0, 7), None))
        items.append((Tag.OTHER, rng.randint(0, 7), None))
        owner = (rng.choice(ids), rng.choice(ids))
        groups = rng.sample([OWNER, 4242], rng.randint(0, 2))
        want = rng.choice([R, X]) if is_dir else R
        name = f"case{case}"
        path = make(acl_dir, name, is_dir=is_dir, owner=owner)
        os.setxattr(path, acl.XATTR_ACCESS, encode(items))
        ours = allowed(path, NOBODY, {NOBODY, *groups}, want)
        assert ours == kernel_allows(acl_dir, name, groups, is_dir, want), (items, owner, groups, want)
