"""Which kind of filesystem holds a path: tells apart the network and cluster filesystems that SQLite's write-ahead
log cannot work on.

Why: SQLite's WAL keeps its index in a memory-mapped ``-shm`` file shared by every process that opens the database.
On NFS, Lustre, GPFS, BeeGFS, CephFS, SMB shares and the like, that mapping is not shared between hosts (and on some
of them not even allowed), so WAL either fails outright ("locking protocol", "disk I/O error") or lets processes on
two hosts corrupt the file. HPC users keep their workflows, and so the default store ``.metatrail/metatrail.db``, on
exactly such filesystems, with Parsl workers on many nodes writing to it. The store (:mod:`metatrail.store.sqlitefile`)
and the hash cache (:mod:`metatrail.hashing`) ask :func:`network_filesystem` and use a rollback journal there.

Contract: :func:`network_filesystem` never raises and does no I/O besides reading the mount table once per directory
asked about (cached for the life of the process: mounts under a running workflow do not move). It returns the
filesystem's type name (as the kernel names it, e.g. ``nfs4``, ``lustre``, ``fuse.sshfs``) when the path lies on a
network or cluster filesystem (a FUSE one that reaches other hosts included), and ``None`` on a local one, or when
it cannot tell (not Linux, the mount table unreadable): then nothing changes from before.

Linux only, from ``/proc/self/mountinfo`` (the mount table as this process sees it, bind mounts and mount namespaces
included; ``/proc/mounts`` escapes the same way but lacks the mount ids). The file's format is documented in
``proc(5)``: ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPEROPTIONS``, with space, tab,
newline and backslash in paths written as octal escapes (``\\040``).
"""

from __future__ import annotations

import functools
import os
import re

MOUNTINFO = "/proc/self/mountinfo"

# Filesystems whose files processes on several hosts share (network and cluster filesystems), or that give no shared
# memory mapping of a file: SQLite's WAL cannot work on them.
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "afs", "coda", "ncpfs",
    "9p", "vboxsf", "panfs", "pvfs2", "orangefs", "wekafs", "ocfs2", "gfs2", "davfs",
})
# FUSE filesystems are named ``fuse.<name>`` (or plain ``fuse``; ``fuseblk`` is a local block device, ntfs-3g and the
# like). Those that reach other hosts count; a local one (bindfs, say) gives WAL what it needs: a bindfs mount of a
# local directory held a WAL database that a second connection read.
NETWORK_FUSE = frozenset({
    "sshfs", "s3fs", "rclone", "gcsfuse", "goofys", "ceph-fuse", "cephfs", "glusterfs", "juicefs", "davfs2",
    "lizardfs", "mfs", "moosefs", "quobyte", "gvfsd-fuse", "blobfuse", "blobfuse2", "cvmfs2", "beegfs", "lustre",
})
FUSE_PREFIX = "fuse."

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_table(text: str) -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of each line of a mountinfo text, in its order (a later mount on the same
    point hides an earlier one). Lines that do not parse are skipped."""
    table = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 6 or not rest or not rest[0]:
            continue
        table.append((_unescape(fields[4]), rest[0]))
    return table


def filesystem_of(path: str, table: list[tuple[str, str]]) -> str | None:
    """The type of the filesystem ``table`` mounts at the longest mount point holding the absolute ``path``."""
    best: tuple[int, str] | None = None
    for point, fstype in table:
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def is_network_type(fstype: str) -> bool:
    """Whether a filesystem of this type is one that SQLite's WAL cannot work on (see :data:`NETWORK_TYPES` and
    :data:`NETWORK_FUSE`)."""
    if fstype.startswith(FUSE_PREFIX):
        return fstype[len(FUSE_PREFIX):] in NETWORK_FUSE
    return fstype in NETWORK_TYPES


def network_filesystem(path: str | os.PathLike[str]) -> str | None:
    """The type of the network, cluster or FUSE filesystem holding ``path`` (or the nearest directory above it that
    exists), ``None`` for a local one or when it cannot be told. Never raises."""
    try:
        where = os.path.abspath(os.fspath(path))
        while not os.path.isdir(where):
            parent = os.path.dirname(where)
            if parent == where:
                break
            where = parent
        return _network_filesystem(MOUNTINFO, os.path.realpath(where))
    except Exception:
        return None


@functools.lru_cache(maxsize=64)
def _network_filesystem(mountinfo: str, directory: str) -> str | None:
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            table = mount_table(f.read())
    except OSError:
        return None
    fstype = filesystem_of(directory, table)
    return fstype if fstype is not None and is_network_type(fstype) else None
