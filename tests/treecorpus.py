"""A deterministic corpus of sample filesystem trees for archive and tree-hashing tests.

``make_corpus(root)`` builds every sample under ``root`` and returns the sample roots.
The same call always produces the same names, bytes, symlink targets, permission bits
and mtimes (everything is set explicitly, independent of umask and clock), so digests
of the samples can be pinned. Not a test module: import it (``from treecorpus import
make_corpus``); pytest puts ``tests/`` on ``sys.path``.

Samples (directory names under ``root``):

* ``empty-file``, ``small-file``, ``exec-file``, ``big-exec-file``: a file as the root
* ``symlink-root``: a (dangling) symlink as the root
* ``empty-dir``: an empty directory as the root
* ``sizes``: files of sizes around the 8-byte padding and 4 KiB / 64 KiB boundaries,
  plus a ~3 MB one
* ``modes``: executable and not, including owner-exec-only and group/other-exec-only
* ``symlinks``: absolute, relative, dangling, to a directory, self-loop, odd targets
* ``unicode``: é (NFC and NFD), 日本, emoji names
* ``odd-names``: spaces, leading dash, newline, tab, ``a:b``, a 255-byte name, case
  ordering, and non-UTF-8 names whose byte order differs from ``str`` order
* ``deep``: 30 nested directories with files on the way
* ``many-files``: a directory of 1000 small files
* ``mixed``: a bit of everything, with empty subdirectories
"""

from __future__ import annotations

import os
import pathlib
import random

MTIME = 1_000_000_000  # fixed mtime for every object, so timestamps are deterministic too

SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 4095, 4096, 4097, 65535, 65536, 65537]
BIG_SIZE = 3 * 1024 * 1024 + 3


def _data(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def _file(path: pathlib.Path | bytes, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _dir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir()
    os.chmod(path, 0o755)
    return path


def _root_files(root: pathlib.Path) -> list[pathlib.Path]:
    _file(root / "empty-file", b"")
    _file(root / "small-file", b"hello, world\n")
    _file(root / "exec-file", b"#!/bin/sh\necho hi\n", 0o755)
    _file(root / "big-exec-file", _data("big-exec", 200_003), 0o755)
    os.symlink("target/does/not/exist", root / "symlink-root")
    _dir(root / "empty-dir")
    return [root / n for n in ("empty-file", "small-file", "exec-file", "big-exec-file",
                                "symlink-root", "empty-dir")]


def _sizes(d: pathlib.Path) -> None:
    for size in SIZES:
        _file(d / f"size-{size:06d}", _data(f"size-{size}", size))
    _file(d / "big", _data("big", BIG_SIZE))
    _file(d / "zeros-65537", b"\0" * 65537)


def _modes(d: pathlib.Path) -> None:
    _file(d / "plain", b"plain\n", 0o644)
    _file(d / "exec", b"exec\n", 0o755)
    _file(d / "owner-exec-only", b"owner\n", 0o744)
    _file(d / "owner-rwx-only", b"private\n", 0o700)
    _file(d / "group-exec-not-owner", b"group\n", 0o654)  # not executable for Nix
    _file(d / "read-only", b"ro\n", 0o444)


def _symlinks(d: pathlib.Path) -> None:
    _dir(d / "dir")
    _file(d / "dir" / "file", b"in dir\n")
    _file(d / "file", b"file\n")
    links = {
        "absolute": "/nonexistent/absolute/target",
        "absolute-root": "/",
        "relative": "file",
        "relative-up": "../symlinks/file",
        "dangling": "does-not-exist",
        "to-dir": "dir",
        "into-dir": "dir/file",
        "self-loop": "self-loop",
        "dot": ".",
        "dotdot": "..",
        "odd target": "with space/and\nnewline/é/日本",
        "long-target": "/".join(["component"] * 100),
    }
    for name, target in links.items():
        os.symlink(target, d / name)


def _unicode(d: pathlib.Path) -> None:
    for name in ("é", "e\u0301", "日本", "日本語のファイル", "😀", "Ωmega", "ß"):
        _file(d / name, name.encode() + b"\n")
    _dir(d / "répertoire")
    _file(d / "répertoire" / "データ", b"data\n")


def _odd_names(d: pathlib.Path) -> None:
    names = ["with space", " leading space", "trailing space ", "-leading-dash", "-",
             "new\nline", "tab\tname", "a:b", "back\\slash", "quote'\"", "*?[glob]",
             ".hidden", "...", "a.b", "B", "a", "A", "b", "x" * 255, "#", "~", "%41"]
    for name in names:
        _file(d / name, name.encode("utf-8", "surrogateescape") + b"\n")
    # Non-UTF-8 and private-use names: byte order differs from Python's str order
    # ('\udcff' < '\ue000' as str, but b'\xff' > b'\xee\x80\x80' as bytes).
    db = bytes(d)
    for name in (b"\xff", b"\xfe\xfd", b"\xee\x80\x80", b"\x01ctrl", b"latin1-\xe9"):
        _file(os.path.join(db, name), name + b"\n")


def _deep(d: pathlib.Path) -> None:
    cur = d
    for level in range(30):
        cur = _dir(cur / f"level-{level:02d}")
        if level % 5 == 0:
            _file(cur / "file", f"level {level}\n".encode(), 0o755 if level % 10 == 0 else 0o644)
    _file(cur / "bottom", b"bottom\n")
    os.symlink("../" * 30 + "top", cur / "to-top")
    _file(d / "top", b"top\n")


def _many_files(d: pathlib.Path) -> None:
    for i in range(1000):
        _file(d / f"f{i:04d}", _data(f"many-{i}", i % 97), 0o755 if i % 7 == 0 else 0o644)


def _mixed(d: pathlib.Path) -> None:
    _dir(d / "bin")
    _file(d / "bin" / "tool", b"#!/bin/sh\nexit 0\n", 0o755)
    _dir(d / "lib")
    _file(d / "lib" / "libthing.so.1.2", _data("lib", 70_000))
    os.symlink("libthing.so.1.2", d / "lib" / "libthing.so.1")
    os.symlink("libthing.so.1", d / "lib" / "libthing.so")
    _dir(d / "share")
    _dir(d / "share" / "empty")
    _dir(d / "share" / "nested-empty")
    _dir(d / "share" / "nested-empty" / "inner")
    _dir(d / "share" / "doc")
    _file(d / "share" / "doc" / "README", b"read me\n")
    os.symlink("../bin", d / "share" / "bin-link")
    _file(d / "empty", b"")


def _freeze_mtimes(root: pathlib.Path) -> None:
    """Set every mtime/atime (without following symlinks), children before parents."""
    broot = bytes(root)
    for dirpath, dirnames, filenames in os.walk(broot, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(broot, (MTIME, MTIME), follow_symlinks=False)


def make_corpus(root: pathlib.Path) -> list[pathlib.Path]:
    """Create the sample trees under ``root`` (which must exist) and return their paths."""
    root = pathlib.Path(root)
    samples = _root_files(root)
    builders = {"sizes": _sizes, "modes": _modes, "symlinks": _symlinks, "unicode": _unicode,
                "odd-names": _odd_names, "deep": _deep, "many-files": _many_files, "mixed": _mixed}
    for name, build in builders.items():
        build(_dir(root / name))
        samples.append(root / name)
    for sample in samples:
        _freeze_mtimes(sample)
    return samples
