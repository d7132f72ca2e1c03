"""A fake of the kernel's mount table, for tests of what metatrail does on network filesystems.

No test machine mounts NFS, so ``metatrail.fstype.MOUNTINFO`` is pointed at a file in the format of ``proc(5)``
(``/proc/self/mountinfo``) that says which directories are network mounts; everything else stays real.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_ROOT = "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n"


def fake_mountinfo(tmp_path: Path, mounts: dict[str, str]) -> Path:
    """A mountinfo file: an ext4 root, then ``mounts`` (mount point -> filesystem type), each a line as the kernel
    writes it (octal escapes in paths, optional fields, the source and super options after the separator)."""
    lines = [LOCAL_ROOT]
    for i, (point, fstype_name) in enumerate(mounts.items()):
        escaped = point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        lines.append(f"{100 + i} 22 0:{50 + i} / {escaped} rw,relatime shared:{10 + i} master:3 - {fstype_name} "
                     f"fileserver:/export/{i} rw,vers=4.2,hard,proto=tcp\n")
    path = tmp_path / "mountinfo"
    path.write_text("".join(lines))
    return path
