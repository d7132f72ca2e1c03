"""Tests for metatrail.hashing: md5 of files, DVC ``.dir`` manifests checked against real dvc-data, the hash
cache (including many processes sharing it), remote URIs, naming and the never-raise error paths.

Everything runs on real files under ``tmp_path``; dvc-data's own ``build()`` is the reference for hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metatrail.hashing import HashCache, dataset_name, dir_manifest, hash_path, md5_file
from metatrail.model import ArtifactRef

MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------
# helpers


def dvc_build() -> Any:
    """dvc-data's ``build`` module. The core test environment installs it (extra ``dvc``); without it these
    tests fail rather than skip, because DVC compatibility is a promise we make."""
    import importlib

    return importlib.import_module("dvc_data.hashfile.build")


def dvc_build_obj(path: Path | str) -> Any:
    """The object real dvc-data builds for ``path`` with the DVC 3 ``md5`` hash name."""
    build = dvc_build().build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory() as odb_dir:
        _, _, obj = build(HashFileDB(fs, odb_dir), os.fspath(path), fs, "md5")
        return obj


def dvc_hash(path: Path | str) -> str:
    """The hash real dvc-data gives ``path`` (file: md5; directory: ``<md5>.dir``), DVC 3 ``md5`` name."""
    obj = dvc_build_obj(path)
    assert obj.hash_info.name == "md5"
    return str(obj.hash_info.value)


def dvc_manifest(path: Path) -> list[dict[str, str]]:
    """The entry list dvc-data serialises into the ``.dir`` object."""
    return list(json.loads(dvc_build_obj(path).as_bytes()))


def hv(ref: ArtifactRef) -> str:
    """The hash value of an artifact that must have one."""
    assert ref.hash is not None, ref.hash_error
    return str(ref.hash.value)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def make_tree(root: Path, files: dict[str, bytes | str], dirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        write(root / rel, data)
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def rewrite_same_size_keep_mtime(path: Path, data: bytes) -> None:
    """Change the bytes in place (same inode, same size) and put the old mtime back, to the nanosecond."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as fobj:
        fobj.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def touch_later(path: Path) -> None:
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


# ----------------------------------------------------------------------------------------------------
# md5_file


@pytest.mark.parametrize(
    "size",
    [0, 1, 4095, MiB - 1, MiB, MiB + 1, 3 * MiB + 17],
    ids=lambda n: f"{n}B",
)
def test_md5_file_equals_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = write(tmp_path / "f.bin", data)
    assert md5_file(path) == hashlib.md5(data).hexdigest()
    assert md5_file(str(path)) == hashlib.md5(data).hexdigest()


def test_md5_file_raises_oserror_on_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        md5_file(tmp_path / "nope")


def test_single_file_equals_dvc_data(tmp_path: Path) -> None:
    path = write(tmp_path / "model.pt", os.urandom(2 * MiB + 5))
    ref = hash_path(path)
    assert ref.kind == "file"
    assert ref.hash is not None
    assert ref.hash.name == "md5"
    assert ref.hash.value == dvc_hash(path)
    assert ref.size == 2 * MiB + 5
    assert ref.nfiles is None
    assert ref.hash_error is None


def test_crlf_text_is_plain_md5_not_dos2unix(tmp_path: Path) -> None:
    data = b"a,b\r\n1,2\r\n"
    path = write(tmp_path / "t.csv", data)
    ref = hash_path(path)
    assert ref.hash is not None
    assert ref.hash.value == hashlib.md5(data).hexdigest() == dvc_hash(path)


# ----------------------------------------------------------------------------------------------------
# directories vs dvc-data


def _nested(root: Path) -> Path:
    return make_tree(
        root,
        {
            "a/b/c/deep.txt": "deep\n",
            "a/x.bin": os.urandom(5000),
            "top.txt": "top",
            "z/last": "zz",
        },
    )


def _unicode(root: Path) -> Path:
    return make_tree(
        root,
        {
            "ünïcödé/ñ.txt": "é",
            "日本語/ファイル": "データ",
            "emoji 😀/🐍.py": "print()",
            'quote"and\\backslash': "q",
            "tab\tname": "t",
            "new\nline": "n",
            "Zebra": "upper first",
            "apple": "lower after",
        },
    )


def _empty_files(root: Path) -> Path:
    return make_tree(root, {"e1": b"", "sub/e2": b"", "sub/deeper/e3": b"", "nonempty": b"x"})


def test_empty_files_hash_to_md5_of_nothing(tmp_path: Path) -> None:
    entries, _ = dir_manifest(_empty_files(tmp_path / "d"))
    assert {e["md5"] for e in entries if e["relpath"] != "nonempty"} == {hashlib.md5(b"").hexdigest()}


def _empty_subdir(root: Path) -> Path:
    return make_tree(root, {"a/f": "f", "b.txt": "b"}, dirs=("empty", "a/also_empty", "nested/empty/leaf"))


def _sort_order(root: Path) -> Path:
    # '-' (0x2d) and '.' (0x2e) sort before '/' (0x2f): DVC sorts by the joined relpath string, not by parts.
    return make_tree(root, {"a-b": "1", "a.b": "2", "a/b": "3", "a0": "4", "a/b-c/d": "5", "A": "6", "_": "7"})


def _many_files(root: Path) -> Path:
    files: dict[str, bytes | str] = {f"d{i % 37:02d}/s{i % 5}/f{i:05d}.dat": os.urandom(i % 300) for i in range(1500)}
    return make_tree(root, files)


def _large_files(root: Path) -> Path:
    # Several files above the thread-pool cut-off, so the parallel path is exercised too.
    return make_tree(root, {f"big{i}": os.urandom(MiB + 1000 * i) for i in range(4)} | {"small": "s"})


def _only_empty_dirs(root: Path) -> Path:
    return make_tree(root, {}, dirs=("a/b", "c"))


def _empty(root: Path) -> Path:
    root.mkdir()
    return root


def _symlinks(root: Path) -> Path:
    make_tree(root, {"real/file.txt": "target", "real/other": "o"})
    (root / "link_to_file").symlink_to(root / "real" / "file.txt")
    (root / "rel_link").symlink_to("real/other")
    (root / "link_to_dir").symlink_to(root / "real", target_is_directory=True)
    return root


TREES = {
    "nested": _nested,
    "unicode": _unicode,
    "empty_files": _empty_files,
    "empty_subdir": _empty_subdir,
    "sort_order": _sort_order,
    "many_files": _many_files,
    "large_files": _large_files,
    "only_empty_dirs": _only_empty_dirs,
    "empty": _empty,
    "symlinks": _symlinks,
}


@pytest.mark.parametrize("tree", list(TREES))
def test_directory_equals_dvc_data(tmp_path: Path, tree: str) -> None:
    root = TREES[tree](tmp_path / "data")
    expected = dvc_hash(root)
    entries, value = dir_manifest(root)
    assert value == expected
    assert value.endswith(".dir")
    assert entries == dvc_manifest(root)

    ref = hash_path(root)
    assert ref.kind == "directory"
    assert ref.hash is not None
    assert ref.hash.value == expected
    assert ref.nfiles == len(entries)
    assert ref.size == sum((root / e["relpath"]).stat().st_size for e in entries)

    # With a cache: cold, then warm, then a fresh cache object on the same file.
    db = tmp_path / "cache" / "hashes.sqlite"
    for cache in (HashCache(db), HashCache(db), HashCache(None)):
        with cache:
            assert hash_path(root, cache).hash == ref.hash
            assert hash_path(root, cache).hash == ref.hash


def test_empty_directory_is_md5_of_empty_list(tmp_path: Path) -> None:
    root = _empty(tmp_path / "e")
    assert dir_manifest(root) == ([], hashlib.md5(b"[]").hexdigest() + ".dir")


def test_trailing_slash_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _nested(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    a, b = hash_path("data/"), hash_path("./data")
    assert a.name == b.name == str(root)
    assert a.hash == b.hash == hash_path(root).hash


def test_non_utf8_file_name_equals_dvc_data(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    name = os.fsdecode(b"latin1-\xe9t\xe9")  # not valid UTF-8: decodes with surrogate escapes
    (root / name).write_bytes(b"bytes")
    write(root / "ok", "ok")
    cache = HashCache(tmp_path / "c.sqlite")
    assert hash_path(root, cache).hash == hash_path(root, cache).hash
    ref = hash_path(root, cache)
    assert ref.hash is not None
    assert ref.hash.value == dvc_hash(root)


def test_dvc_default_ignores_match_dvc_add(tmp_path: Path) -> None:
    """``.git``, ``.hg/``, ``.dvc/`` and nested DVC repos are left out, as ``dvc add`` leaves them out."""
    clean = _nested(tmp_path / "clean")
    noisy = tmp_path / "noisy"
    shutil.copytree(clean, noisy)
    make_tree(
        noisy,
        {
            ".git/HEAD": "ref: refs/heads/main",
            "a/.git": "gitdir: ../.git/modules/a",  # a submodule's .git is a file
            ".hg/store/x": "hg",
            ".dvc/config": "[core]",
            "subrepo/.dvc/config": "[core]",
            "subrepo/data.csv": "inside a nested DVC repo",
        },
    )
    assert hash_path(noisy).hash == hash_path(clean).hash
    assert hash_path(noisy).hash is not None
    assert hv(hash_path(noisy)) == dvc_hash(clean)


def test_files_named_like_dvc_dirs_are_kept(tmp_path: Path) -> None:
    # DVC's patterns are ".hg/" and ".dvc/": they match directories only, so files of those names are data.
    root = make_tree(tmp_path / "d", {".hg": "file", ".dvc": "file", "x.dvc": "dvc file", "f": "f"})
    assert hv(hash_path(root)) == dvc_hash(root)
    assert hash_path(root).nfiles == 4


def test_a_dvc_file_does_not_make_a_nested_repository(tmp_path: Path) -> None:
    """Only a ``.dvc`` directory marks a nested DVC repository; a sub-directory holding a ``.dvc`` file is data."""
    root = make_tree(tmp_path / "d", {"x/.dvc": "a file, not a repository", "x/data.csv": "kept", "y": "1"})
    entries, value = dir_manifest(root)
    assert [e["relpath"] for e in entries] == ["x/.dvc", "x/data.csv", "y"]
    assert value == dvc_hash(root)


def test_dvcignore_inside_is_hashed_as_a_file(tmp_path: Path) -> None:
    """DVC refuses a directory holding a .dvcignore; we hash it whole, the .dvcignore as an ordinary file."""
    root = make_tree(tmp_path / "d", {".dvcignore": "*.tmp\n", "keep.csv": "k", "skip.tmp": "s"})
    with pytest.raises(dvc_build().IgnoreInCollectedDirError):
        dvc_hash(root)
    entries, value = dir_manifest(root)
    assert [e["relpath"] for e in entries] == [".dvcignore", "keep.csv", "skip.tmp"]
    assert hv(hash_path(root)) == value


# ----------------------------------------------------------------------------------------------------
# the cache


def test_cache_hit_reads_no_bytes_file(tmp_path: Path) -> None:
    """A cache hit is proven by a stale answer: bytes changed in place, inode/size/mtime_ns kept -> old hash.

    This is the documented trade-off DVC makes too; without a cache the new bytes are read.
    """
    path = write(tmp_path / "f.bin", b"A" * 4096)
    cache = HashCache(tmp_path / "c.sqlite")
    first = hv(hash_path(path, cache))
    assert first == hashlib.md5(b"A" * 4096).hexdigest()
    rewrite_same_size_keep_mtime(path, b"B" * 4096)
    assert hv(hash_path(path, cache)) == first
    assert HashCache(tmp_path / "c.sqlite").get(str(path), path.stat()) == first
    assert hv(hash_path(path)) == hashlib.md5(b"B" * 4096).hexdigest()


def test_cache_hit_reads_no_bytes_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {f"s{i % 3}/f{i}": os.urandom(100) for i in range(30)})
    cache = HashCache(tmp_path / "c.sqlite")
    first = hash_path(root, cache).hash
    for f in root.rglob("f*"):
        rewrite_same_size_keep_mtime(f, os.urandom(100))
    assert hash_path(root, cache).hash == first
    assert hash_path(root).hash != first
    assert hv(hash_path(root)) == dvc_hash(root)


def test_touched_file_is_rehashed(tmp_path: Path) -> None:
    path = write(tmp_path / "f.bin", b"A" * 4096)
    cache = HashCache(tmp_path / "c.sqlite")
    hash_path(path, cache)
    rewrite_same_size_keep_mtime(path, b"B" * 4096)
    touch_later(path)
    assert hv(hash_path(path, cache)) == hashlib.md5(b"B" * 4096).hexdigest()


def test_directory_changes_are_seen(tmp_path: Path) -> None:
    root = _nested(tmp_path / "d")
    cache = HashCache(tmp_path / "c.sqlite")
    seen = {hash_path(root, cache).hash}

    write(root / "a" / "x.bin", os.urandom(10))  # new content and size
    changed = hash_path(root, cache)
    assert hv(changed) == dvc_hash(root)
    write(root / "added", "new file")
    added = hash_path(root, cache)
    assert hv(added) == dvc_hash(root)
    (root / "top.txt").unlink()
    removed = hash_path(root, cache)
    assert hv(removed) == dvc_hash(root)
    (root / "z" / "last").rename(root / "z" / "renamed")  # same inode, size, mtime; new path
    renamed = hash_path(root, cache)
    assert hv(renamed) == dvc_hash(root)
    seen |= {changed.hash, added.hash, removed.hash, renamed.hash}
    assert len(seen) == 5


def test_replaced_file_same_size_and_mtime_new_inode_is_rehashed(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"old!")
    cache = HashCache(tmp_path / "c.sqlite")
    hash_path(path, cache)
    old = path.stat()
    tmp = write(tmp_path / "f.tmp", b"new!")
    os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(tmp, path)  # atomic replace: a new inode, as most writers produce
    assert path.stat().st_ino != old.st_ino
    assert hv(hash_path(path, cache)) == hashlib.md5(b"new!").hexdigest()


def test_file_and_directory_share_cache_rows(tmp_path: Path) -> None:
    root = _nested(tmp_path / "d")
    cache = HashCache(tmp_path / "c.sqlite")
    file_ref = hash_path(root / "top.txt", cache)
    rewrite_same_size_keep_mtime(root / "top.txt", b"TOP")
    entries, _ = dir_manifest(root, cache)
    assert {e["relpath"]: e["md5"] for e in entries}["top.txt"] == hv(file_ref)


def test_get_dir_entries_is_exactly_the_subtree(tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "c.sqlite")
    st_ = (tmp_path).stat()
    paths = ["/x/data/a", "/x/data/sub/b", "/x/data-2/c", "/x/data0/d", "/x/dat/e", "/x/data"]
    cache.put_many([(p, st_, f"{i:032x}") for i, p in enumerate(paths)])
    got = cache.get_dir_entries("/x/data")
    assert set(got) == {"/x/data/a", "/x/data/sub/b"}
    assert got["/x/data/a"] == (st_.st_ino, st_.st_size, st_.st_mtime_ns, f"{0:032x}")
    assert set(cache.get_dir_entries("/x/data/")) == set(got)
    assert cache.get_dir_entries("/nowhere") == {}


def test_get_put_roundtrip_and_stat_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "x")
    st_ = path.stat()
    for cache in (HashCache(tmp_path / "c.sqlite"), HashCache(None)):
        assert cache.get(str(path), st_) is None
        cache.put(str(path), st_, "0" * 32)
        assert cache.get(str(path), st_) == "0" * 32
        touch_later(path)
        assert cache.get(str(path), path.stat()) is None
        cache.put(str(path), path.stat(), "1" * 32)  # replaces the row
        assert cache.get(str(path), path.stat()) == "1" * 32
        cache.close()
        st_ = path.stat()


def test_cache_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    HashCache(db).put(str(db), tmp_path.stat(), "0" * 32)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_cache_degrades_to_uncached(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _nested(tmp_path / "d")
    db = write(tmp_path / "c.sqlite", b"this is not an SQLite database, just text" * 100)
    cache = HashCache(db)
    with caplog.at_level(logging.WARNING, logger="metatrail.hashing"):
        ref = hash_path(root, cache)
        again = hash_path(root / "top.txt", cache)
    assert hv(ref) == dvc_hash(root)
    assert again.hash is not None
    assert sum("hash cache" in r.getMessage() for r in caplog.records) == 1  # warned once, not per call


def test_unwritable_cache_location_degrades(tmp_path: Path) -> None:
    blocker = write(tmp_path / "a-file", "x")
    cache = HashCache(blocker / "sub" / "c.sqlite")  # its parent "directory" is a file
    root = _nested(tmp_path / "d")
    assert hv(hash_path(root, cache)) == dvc_hash(root)
    assert cache.get_dir_entries(str(root)) == {}


def test_locked_cache_never_raises_and_is_bounded(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    root = _nested(tmp_path / "d")
    cache = HashCache(db, busy_timeout_s=0.05)
    hash_path(root / "top.txt", cache)  # creates the file in WAL mode
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write
    try:
        start = time.monotonic()
        write(root / "new", "new")
        ref = hash_path(root, cache)
        assert hv(ref) == dvc_hash(root)
        assert time.monotonic() - start < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Busy is transient: once the lock is gone the cache works again.
    hash_path(root, cache)
    assert str(root / "new") in cache.get_dir_entries(str(root))


def test_cache_shared_by_threads(tmp_path: Path) -> None:
    root = _many_files(tmp_path / "d")
    expected = dvc_hash(root)
    cache = HashCache(tmp_path / "c.sqlite")
    targets = [root, root / "d01", root / "d02" / "s2", root] * 4
    with ThreadPoolExecutor(8) as pool:
        refs = list(pool.map(lambda p: hash_path(p, cache), targets))
    assert {hv(r) for r in refs[::4]} == {expected}
    reference = {p: dvc_hash(p) for p in set(targets)}
    assert [hv(r) for r in refs] == [reference[p] for p in targets]


def _hash_worker(args: tuple[str, list[str], int]) -> list[tuple[str, str | None, str | None]]:
    db, paths, rounds = args
    cache = HashCache(db)
    out = []
    for _ in range(rounds):
        for p in paths:
            ref = hash_path(p, cache)
            out.append((p, ref.hash.value if ref.hash else None, ref.hash_error))
    cache.close()
    return out


@pytest.mark.slow
def test_cache_shared_by_many_processes(tmp_path: Path) -> None:
    base = tmp_path / "shared"
    for i in range(6):
        make_tree(base / f"part{i}", {f"s{j % 4}/f{j}": os.urandom(50 + j) for j in range(150)})
    write(base / "big.bin", os.urandom(3 * MiB))
    targets = [str(base), *(str(base / f"part{i}") for i in range(6)), str(base / "part0" / "s1")]
    targets.append(str(base / "big.bin"))
    expected = {t: dvc_hash(t) for t in targets}
    db = str(tmp_path / "cache" / "hashes.sqlite")
    # Each process walks the targets in a different order, so cold writes of overlapping trees collide.
    jobs = [(db, targets[k % len(targets) :] + targets[: k % len(targets)], 3) for k in range(8)]
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest process
    with ctx.Pool(8) as pool:
        results = pool.map(_hash_worker, jobs)
    for result in results:
        for path, value, error in result:
            assert error is None
            assert value == expected[path]
    rows = HashCache(db).get_dir_entries(str(base))
    assert len(rows) == 6 * 150 + 1


def test_forked_child_reopens_connection(tmp_path: Path) -> None:
    root = _nested(tmp_path / "d")
    cache = HashCache(tmp_path / "c.sqlite")
    parent_hash = hash_path(root, cache).hash
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork in a threaded process
        pid = os.fork()
    if pid == 0:  # child: use the inherited cache object, then report
        try:
            ok = hash_path(root, cache).hash == parent_hash and cache._pid == os.getpid()
            write(root / "from-child", "c")
            ok = ok and hash_path(root, cache).hash is not None
            os.write(write_fd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_fd, 1) == b"1"
    os.close(read_fd)
    assert status == 0
    assert str(root / "from-child") in cache.get_dir_entries(str(root))  # the child's write landed


# ----------------------------------------------------------------------------------------------------
# names, remotes, errors


@pytest.mark.parametrize(
    ("uri", "namespace", "name"),
    [
        ("s3://bucket/path/to/key.parquet", "s3://bucket", "path/to/key.parquet"),
        ("s3a://bucket/key", "s3a://bucket", "key"),
        ("gs://my-bucket/dir/obj", "gs://my-bucket", "dir/obj"),
        ("https://example.org/data/file.csv", "https://example.org", "/data/file.csv"),
        ("http://host:8080/p", "http://host:8080", "/p"),
        ("https://user:secret@example.org/p?sig=abc#frag", "https://example.org", "/p"),
        ("hdfs://namenode:8020/user/x/part-0000", "hdfs://namenode:8020", "/user/x/part-0000"),
        (
            "abfss://container@account.dfs.core.windows.net/dir/f",
            "abfss://container@account.dfs.core.windows.net",
            "dir/f",
        ),
        ("file:///tmp/x/y.txt", "file", "/tmp/x/y.txt"),
        ("file://localhost/tmp/a%20b", "file", "/tmp/a b"),
        ("file://fileserver/share/f", "file://fileserver", "/share/f"),
        ("S3://Bucket/Key", "s3://Bucket", "Key"),
        ("s3://bucket", "s3://bucket", "/"),
        ("/abs/./path/../file", "file", "/abs/file"),
        ("/abs/dir/", "file", "/abs/dir"),
    ],
)
def test_dataset_name(uri: str, namespace: str, name: str) -> None:
    assert dataset_name(uri) == (namespace, name)


def test_dataset_name_relative_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_name("out/model.pt") == ("file", str(tmp_path / "out" / "model.pt"))
    assert dataset_name(Path("x")) == ("file", str(tmp_path / "x"))


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/key",
        "gs://b/k",
        "https://example.org/f",
        "http://example.org/f",
        "hdfs://nn:8020/p",
        "abfss://c@a.dfs.core.windows.net/p",
        "file://otherhost/p",
    ],
)
def test_remote_uri_not_downloaded(uri: str) -> None:
    ref = hash_path(uri)
    assert ref.kind == "remote"
    assert ref.hash is None
    assert ref.hash_error == "remote: not downloaded"
    assert ref.uri == uri
    assert (ref.namespace, ref.name) == dataset_name(uri)


def test_local_file_uri_is_hashed(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", "hello")
    ref = hash_path(path.as_uri())
    assert (ref.kind, ref.namespace, ref.name) == ("file", "file", str(path))
    assert hv(ref) == hashlib.md5(b"hello").hexdigest()


def test_missing_path(tmp_path: Path) -> None:
    ref = hash_path(tmp_path / "nope")
    assert (ref.kind, ref.hash, ref.hash_error) == ("missing", None, "missing")
    assert (ref.namespace, ref.name) == ("file", str(tmp_path / "nope"))
    ref = hash_path(write(tmp_path / "file", "x") / "below")  # a path through a file
    assert (ref.kind, ref.hash, ref.hash_error) == ("missing", None, "missing")


def test_broken_symlink(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    ref = hash_path(tmp_path / "dangling")
    assert (ref.kind, ref.hash, ref.hash_error) == ("missing", None, "broken symlink")


def test_directory_with_broken_symlink_has_no_hash(tmp_path: Path) -> None:
    root = _nested(tmp_path / "d")
    (root / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    ref = hash_path(root)
    assert (ref.kind, ref.hash) == ("directory", None)
    assert ref.hash_error == "broken symlink: 'a/dangling'"
    with pytest.raises(FileNotFoundError):  # dvc-data cannot hash it either
        dvc_hash(root)


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    ref = hash_path(fifo)  # opening a FIFO for reading would block forever
    assert (ref.kind, ref.hash, ref.hash_error) == ("file", None, "not a regular file")
    root = _nested(tmp_path / "d")
    os.mkfifo(root / "a" / "fifo")
    ref = hash_path(root)
    assert (ref.kind, ref.hash, ref.hash_error) == ("directory", None, "not a regular file: 'a/fifo'")


def _probe(paths: list[str]) -> list[list[str | None]]:
    return [[r.kind, r.hash and r.hash.value, r.hash_error] for r in map(hash_path, paths)]


def _probe_as_nobody(paths: list[str]) -> list[list[str | None]]:
    """Run the probe in a forked child that dropped root (no exec: the interpreter may sit in root's home)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork in a threaded process; the child only hashes and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_fd, json.dumps(_probe(paths)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return list(json.loads(b"".join(chunks)))


def _unreadable_tree(base: Path) -> tuple[list[str], str]:
    base.chmod(0o755)
    secret = write(base / "secret.bin", "s")
    secret.chmod(0)
    root = make_tree(base / "d", {"ok": "ok", "locked/inside": "x", "sub/secret": "y"})
    (root / "sub" / "secret").chmod(0)
    (root / "locked").chmod(0)
    closed = make_tree(base / "closed", {"f": "f"})
    closed.chmod(0)
    readable = write(base / "fine.txt", "fine")
    paths = [str(secret), str(root), str(closed / "f"), str(closed), str(readable)]
    return paths, hashlib.md5(b"fine").hexdigest()


def test_permission_denied_never_raises() -> None:
    # As root every chmod is ignored, so the probe runs as an unprivileged user in a child process.
    base = Path(tempfile.mkdtemp(prefix="metatrail-perm-"))
    try:
        paths, fine_md5 = _unreadable_tree(base)
        results = _probe_as_nobody(paths) if os.geteuid() == 0 else _probe(paths)
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        shutil.rmtree(base)
    assert results[0] == ["file", None, "permission denied"]
    kind, value, error = results[1]
    assert (kind, value) == ("directory", None)
    assert error in ("permission denied: 'locked'", "permission denied: 'sub/secret'")
    assert results[2] == ["file", None, "permission denied"]  # cannot even stat it
    assert results[3] == ["directory", None, "permission denied: '.'"]
    assert results[4] == ["file", fine_md5, None]


# ----------------------------------------------------------------------------------------------------
# property test


_NAME = st.text(alphabet=st.sampled_from(list("abcAB-_.é日😀 0")), min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..", ".git", ".hg", ".dvc", ".dvcignore")
)
_TREE = st.dictionaries(
    st.lists(_NAME, min_size=1, max_size=3).map(tuple),
    st.binary(max_size=64),
    max_size=12,
)


def _materialise(root: Path, spec: dict[tuple[str, ...], bytes]) -> None:
    root.mkdir()
    used_as_dir: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    for parts, data in sorted(spec.items()):
        prefixes = {parts[:i] for i in range(1, len(parts))}
        if parts in used_as_dir or prefixes & files:
            continue  # a name cannot be both a file and a directory
        used_as_dir |= prefixes
        files.add(parts)
        write(root.joinpath(*parts), data)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="metatrail-hyp-"))
    yield path
    shutil.rmtree(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_TREE)
def test_property_random_trees_match_dvc_data(scratch: Path, spec: dict[tuple[str, ...], bytes]) -> None:
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        root = work / "tree"
        _materialise(root, spec)
        cache = HashCache(work / "c.sqlite")
        first = hash_path(root, cache)
        assert first.hash is not None
        assert first.hash == hash_path(root, cache).hash == hash_path(root).hash
        assert first.hash.value == dvc_hash(root)
        assert first.nfiles == sum(1 for p in root.rglob("*") if p.is_file())
        cache.close()
    finally:
        shutil.rmtree(work)


def test_stat_helper_sanity(tmp_path: Path) -> None:
    # Guards the premise of the stale-hash tests: this filesystem keeps nanosecond mtimes we can set exactly.
    path = write(tmp_path / "f", "x")
    os.utime(path, ns=(1, 1_234_567_891))
    assert path.stat().st_mtime_ns == 1_234_567_891
    assert stat.S_ISREG(path.stat().st_mode)


EXIT_WHILE_HASHING = """
import sys
from metatrail.recorder import Recorder

rec = Recorder()
ex = rec.execution_started("p", "s")
rec.execution_finished(ex, outputs=[sys.argv[1]])  # hashed by the writer thread, after this returns
print("main returns", flush=True)
"""


def test_exit_does_not_wait_for_a_directory_still_being_hashed(tmp_path: Path) -> None:
    """A process that ends while its writer hashes a large output directory exits after about the flush timeout,
    not after the whole directory: the hashing threads hold no exit."""
    out = tmp_path / "out"
    out.mkdir()
    for i in range(32):  # 32 GiB of holes: half a minute of md5 on two cores, no disk
        with open(out / f"part{i:02}", "wb") as fh:
            fh.truncate(1 << 30)
    env = {**os.environ, "METATRAIL_FLUSH_TIMEOUT": "2", "METATRAIL_WRITER": "thread", "METATRAIL_ENERGY": "0"}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", EXIT_WHILE_HASHING, str(out)], capture_output=True, text=True,
                            env=env, timeout=120)
    took = time.monotonic() - began
    assert result.stdout == "main returns\n" and result.returncode == 0, result.stderr
    assert took < 12, f"exit took {took:.1f} s with a flush timeout of 2 s"
    assert "events were not stored before exit" in result.stderr
