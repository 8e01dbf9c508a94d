"""POSIX access ACLs of the source, checked by the daemon for the process asking.

The mount uses the kernel's `default_permissions`, which checks mode bits only: the POSIX
ACLs of the source never reach it, so a 0644 file whose ACL says `user:nobody:---` would be
readable by nobody through the mount. The adapter therefore reads the source's
`system.posix_acl_access` xattr and evaluates it here for the requester FUSE names (uid, gid,
pid) on open, opendir and lookup, for the file and each directory above it.

This can only take access away: the kernel's mode-bit check on the mount comes first, and
it judges a named user or group of the ACL as "other", so an entry granting one more than
the mode's other bits is refused before the daemon is asked.

Parsing follows Linux's xattr format and its posix_acl_valid(); evaluation follows Linux's
posix_acl_permission() wrapped in what generic_permission() adds (uid 0, an empty mask).
Anything unexpected (malformed ACL, unknown supplementary groups) errs toward denying.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat as stat_mod
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

XATTR_ACCESS = "system.posix_acl_access"
XATTR_VERSION = 2
UNDEFINED_ID = 0xFFFFFFFF

# Permission bits of an ACL entry; the same values as os.R_OK, os.W_OK and os.X_OK.
R = 4
W = 2
X = 1
RWX = R | W | X

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def supports_acls(path: str | bytes, follow: bool = True) -> bool:
    """Whether the filesystem of path (a directory or regular file) has POSIX ACLs; any answer
    but "not supported" (ENODATA: it has none here; EACCES) counts as yes: checked, not skipped."""
    try:
        os.getxattr(path, XATTR_ACCESS, follow_symlinks=follow)
    except OSError as e:
        return e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


def source_has_acls(root: str) -> bool:
    """Whether the filesystem at a source's root has POSIX ACLs (logged: the users' checks
    depend on it). NFSv4's own ACLs are of another kind, checked by the NFS server for the
    daemon's user, never for ours."""
    if not supports_acls(root):
        try:
            os.getxattr(root, "system.nfs4_acl")
            log.warning("the source has NFSv4 ACLs: fusecache cannot enforce them; users of the "
                        "mount are checked against the mode bits only")
        except OSError:
            log.info("the source has no POSIX ACLs; users of the mount are checked against the mode bits")
        return False
    return True


class Tag(enum.IntEnum):
    USER_OBJ = 0x01
    USER = 0x02
    GROUP_OBJ = 0x04
    GROUP = 0x08
    MASK = 0x10
    OTHER = 0x20


# The order Linux requires (posix_acl_valid): after each tag, which tags may come next.
_NEXT: dict[Tag | None, frozenset[Tag]] = {
    None: frozenset({Tag.USER_OBJ}),
    Tag.USER_OBJ: frozenset({Tag.USER, Tag.GROUP_OBJ}),
    Tag.USER: frozenset({Tag.USER, Tag.GROUP_OBJ}),
    Tag.GROUP_OBJ: frozenset({Tag.GROUP, Tag.MASK, Tag.OTHER}),
    Tag.GROUP: frozenset({Tag.GROUP, Tag.MASK, Tag.OTHER}),
    Tag.MASK: frozenset({Tag.OTHER}),
    Tag.OTHER: frozenset(),
}


class MalformedAcl(ValueError):
    """An ACL xattr value that is not a valid Linux access ACL; callers deny access."""


@dataclass(frozen=True)
class AclEntry:
    tag: Tag
    perm: int
    id: int | None  # the uid or gid of a USER or GROUP entry, None for the others


@dataclass(frozen=True)
class Acl:
    """A valid access ACL, entries in Linux's order. Immutable and hashable, so callers
    may cache one per (inode, ctime)."""

    entries: tuple[AclEntry, ...]

    @classmethod
    def from_mode(cls, mode: int) -> Acl:
        """The minimal ACL that the permission bits of mode express."""
        return cls((AclEntry(Tag.USER_OBJ, (mode >> 6) & RWX, None),
                    AclEntry(Tag.GROUP_OBJ, (mode >> 3) & RWX, None),
                    AclEntry(Tag.OTHER, mode & RWX, None)))

    @property
    def is_minimal(self) -> bool:
        """Only owner, owning group and other: what the mode bits already say."""
        return len(self.entries) == 3

    @property
    def mask(self) -> int:
        """The MASK entry's permissions; all of them where there is none."""
        return next((e.perm for e in self.entries if e.tag is Tag.MASK), RWX)

    def permits(self, owner: int, owning_group: int, uid: int, groups: frozenset[int] | None,
                want: int) -> bool:
        """Whether this ACL grants uid, a member of groups, every bit of want (R, W, X),
        exactly as Linux's posix_acl_permission() decides. uid 0 gets no special treatment
        here (see check()).

        groups None means the requester's groups are unknown: then a group-class answer is
        yes only if it would be yes whatever the groups, that is only if every group entry
        (masked) and OTHER grant want.
        """
        want &= RWX
        mask = self.mask
        matched_group = False
        for entry in self.entries:
            if entry.tag is Tag.USER_OBJ:
                if uid == owner:
                    return entry.perm & want == want
            elif entry.tag is Tag.USER:
                if uid == entry.id:
                    return entry.perm & mask & want == want
            elif entry.tag is Tag.GROUP_OBJ or entry.tag is Tag.GROUP:
                # Linux stops at the first matching entry that grants want unmasked and
                # answers with the mask; every later match meets the same mask, so asking
                # whether any matching entry grants want masked is the same question.
                grants = entry.perm & mask & want == want
                if groups is None:
                    if not grants:
                        return False
                elif (owning_group if entry.tag is Tag.GROUP_OBJ else entry.id) in groups:
                    if grants:
                        return True
                    matched_group = True
            elif entry.tag is Tag.OTHER:
                return not matched_group and entry.perm & want == want
        return False  # not reached: a valid ACL ends with OTHER


def parse_access_acl(value: bytes) -> Acl:
    """Decode a system.posix_acl_access value and check it as Linux's posix_acl_valid() does:
    tags in order, exactly one USER_OBJ, GROUP_OBJ and OTHER, a MASK wherever there are
    named entries, no permission bits beyond rwx."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise MalformedAcl(f"ACL of {len(value)} bytes: not a 4-byte header and 8-byte entries")
    (version,) = _HEADER.unpack_from(value)
    if version != XATTR_VERSION:
        raise MalformedAcl(f"ACL version {version}, expected {XATTR_VERSION}")
    entries = []
    previous: Tag | None = None
    needs_mask = False
    for raw_tag, perm, raw_id in _ENTRY.iter_unpack(value[_HEADER.size:]):
        try:
            tag = Tag(raw_tag)
        except ValueError:
            raise MalformedAcl(f"ACL entry with unknown tag {raw_tag:#x}") from None
        if tag not in _NEXT[previous]:
            expected = " or ".join(t.name for t in sorted(_NEXT[previous]))
            raise MalformedAcl(f"ACL entry {tag.name} where {expected} must come")
        if perm & ~RWX:
            raise MalformedAcl(f"ACL entry {tag.name} with permission bits {perm:#o}")
        named = tag is Tag.USER or tag is Tag.GROUP
        if named and raw_id == UNDEFINED_ID:
            raise MalformedAcl(f"ACL entry {tag.name} without an id")
        if tag is Tag.OTHER and needs_mask and previous is not Tag.MASK:
            raise MalformedAcl("ACL with named entries but no MASK")
        needs_mask = needs_mask or named
        entries.append(AclEntry(tag, perm, raw_id if named else None))
        previous = tag
    if previous is not Tag.OTHER:
        raise MalformedAcl("ACL does not end with an OTHER entry")
    return Acl(tuple(entries))


def read_access_acl(target: int | str | os.PathLike[str]) -> Acl | None:
    """The access ACL of an open file (fd, O_PATH ones included) or of a path (symlinks not
    followed).

    None where the mode bits say it all: no ACL, a filesystem without ACLs, or a minimal ACL.
    A malformed value raises MalformedAcl; other OSErrors propagate.
    """
    try:
        if isinstance(target, int):  # through /proc: works for O_PATH descriptors too
            value = os.getxattr(f"/proc/self/fd/{target}", XATTR_ACCESS)
        else:
            value = os.getxattr(target, XATTR_ACCESS, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    acl = parse_access_acl(value)
    return None if acl.is_minimal else acl


def requester_groups(pid: int, gid: int) -> frozenset[int] | None:
    """The requester's groups: gid (FUSE's fsgid) and the supplementary groups of thread pid.

    None when they cannot be known: the thread is gone, is not visible in our pid namespace
    (FUSE sends pid 0), or its fsgid is no longer gid (the id was reused, or the thread
    changed credentials). Falling back to {gid} would not fail closed: a group entry that
    denies keeps its members from OTHER's permissions, so forgetting a group can grant.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError as e:
        log.debug("groups of pid %d unknown: %s", pid, e)
        return None
    fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
    try:
        fsgid = int(fields[b"Gid"].split()[3])
        supplementary = [int(g) for g in fields[b"Groups"].split()]
    except (KeyError, IndexError, ValueError):
        log.warning("unexpected /proc/%d/status, groups unknown", pid)
        return None
    if fsgid != gid:
        log.debug("pid %d has fsgid %d, not %d: groups unknown", pid, fsgid, gid)
        return None
    return frozenset([gid, *supplementary])


def check(acl: Acl | None, st: os.stat_result, uid: int, groups: frozenset[int] | None,
          want: int) -> bool:
    """Whether uid, a member of groups (None: unknown), may have want (R, W, X) on the file
    that st describes, whose access ACL is acl (None: the mode bits of st), as Linux's
    generic_permission() decides on the source.

    uid 0 is allowed everything but execute on a non-directory whose mode has no x bit, as
    CAP_DAC_OVERRIDE is: always R, always X on directories.

    Like Linux, and unlike POSIX.1e, the ACL is ignored when the group class of the mode
    (the mask of an ACL) grants nothing: then a named user or group gets OTHER's permissions,
    which is also what the kernel's mode-bit check on the mount decides.
    """
    if uid == 0:
        return stat_mod.S_ISDIR(st.st_mode) or not (want & X) or bool(st.st_mode & 0o111)
    if acl is None or not st.st_mode & 0o070:
        acl = Acl.from_mode(st.st_mode)
    return acl.permits(st.st_uid, st.st_gid, uid, groups, want)
