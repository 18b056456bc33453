"""Host fingerprints: a cheap, stat-cached digest of what a build borrows from the host.

A build may read its ``[sandbox] host_paths`` (``/usr``, ``/bin``, ...). Walking ``/usr``
on every realise costs seconds, so (``spec/sandbox.md``, "Host fingerprints"):

* a host path that the package manager owns (``/usr``, ``/bin``, ``/lib*``, ``/sbin``,
  ``/opt`` on a dpkg system) is fingerprinted by the digest of dpkg's database
  (``/var/lib/dpkg/status``); this detects any package install, upgrade or removal, but
  not a file edited by hand without the package manager. ``/etc`` is not taken so: its
  ``hostname``, ``machine-id``, ``passwd`` or ``resolv.conf`` no package owns, and it is
  small enough to walk;
* any other host path is walked, and each file's content digest is cached by
  (device, inode, size, mtime, ctime), so an unchanged tree costs one stat per entry;
* the builder, when it is a host file, is hashed by content (stat-cached).

Fingerprints never change what is built or the output paths; they go into build records
so ``fimio diff`` can name the host path that changed between two builds.
"""

from __future__ import annotations

import json
import os
import stat
import threading

import blake3

from .sandbox import hidden_roots

DPKG_STATUS = "/var/lib/dpkg/status"
PACKAGE_MANAGED = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
_WALK_LIMIT = 20000  # entries; past this a non-package path is summarised by stats only


class HostFingerprinter:
    """Computes fingerprints with a persistent stat cache kept in the store database."""

    def __init__(self, db=None, hidden=()):
        """``hidden``: directories builds do not see (the store's physical root), left out of
        the trees walked, as are kernel pseudo filesystems (/proc: no part of a host tree,
        and some of its files never end when read)."""
        self.db = db
        self._hidden = set(hidden)
        self._skip: set[str] | None = None  # hidden + pseudo filesystem mounts, when first needed
        self._memo: dict[str, str] = {}
        self._new: dict[bytes, str] = {}  # digests computed since the last save (one transaction)
        self._lock = threading.Lock()  # builds fingerprint in parallel threads

    def _cached_file_digest(self, path: str, st: os.stat_result) -> str:
        key = f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()
        if key in self._new:
            return self._new[key]
        if self.db is not None:
            with self.db.read() as txn:
                hit = txn.get(key, db=self.db.dbs["statcache"])
            if hit is not None:
                return hit.decode()
        h = blake3.blake3()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        self._new[key] = digest
        return digest

    def _save(self) -> None:
        """Record the digests computed since the last save, in one transaction (a first walk
        of a tree would otherwise commit, and sync, once per file)."""
        with self._lock:
            new, self._new = self._new, {}
        if self.db is not None and new:
            with self.db.write() as txn:
                for key, digest in new.items():
                    txn.put(key, digest.encode(), db=self.db.dbs["statcache"])

    def file(self, path: str) -> str:
        """Content digest of a host file (following symlinks), or 'absent'."""
        try:
            st = os.stat(path)
        except OSError:
            return "absent"
        if not stat.S_ISREG(st.st_mode):
            return "not-a-file"
        try:
            return "blake3:" + self._cached_file_digest(os.path.realpath(path), st)
        except OSError:
            return "unreadable"

    def package_db(self) -> str:
        if "dpkg" not in self._memo:
            self._memo["dpkg"] = self.file(DPKG_STATUS)
        return self._memo["dpkg"]

    def path(self, host_path: str) -> dict:
        """The fingerprint record of one host path."""
        try:
            st = os.lstat(host_path)
        except OSError:
            return {"kind": "absent"}
        if stat.S_ISLNK(st.st_mode):
            return {"kind": "symlink", "target": os.readlink(host_path)}
        if stat.S_ISREG(st.st_mode):
            return {"kind": "file", "digest": self.file(host_path)}
        managed = any(host_path == p or host_path.startswith(p + "/") for p in PACKAGE_MANAGED)
        if managed and os.path.exists(DPKG_STATUS):
            return {"kind": "packages", "packages": self.package_db()}
        if self._skip is None:
            self._skip = self._hidden | _pseudo_mounts()
        real = os.path.realpath(host_path)
        if any(real == d or real.startswith(d.rstrip("/") + "/") for d in self._skip):
            return {"kind": "not-walked"}
        # the skipped directories as the walk spells them (through a symlinked host path too)
        skip = set(hidden_roots([host_path], self._skip))
        return {"kind": "tree", "digest": self._walk_digest(host_path, skip)}

    def _walk_digest(self, root: str, skip: set[str]) -> str:
        h = blake3.blake3()
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip)
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                count += 1
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                rel = os.path.relpath(p, root)
                if stat.S_ISREG(st.st_mode):
                    digest = f"{st.st_size}:{st.st_mtime_ns}"  # past the limit, or unreadable (/etc/shadow)
                    if count <= _WALK_LIMIT:
                        try:
                            digest = self._cached_file_digest(p, st)
                        except OSError:
                            pass
                    h.update(f"f {rel} {st.st_mode & 0o111:o} {digest}\n".encode())
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        h.update(f"l {rel} {os.readlink(p)}\n".encode())
                    except OSError:  # gone meanwhile, or not ours to read
                        h.update(f"l {rel} ?\n".encode())
        return "blake3:" + h.hexdigest()

    def fingerprint(self, host_paths: list[str], builder: str) -> dict:
        """Fingerprints of every host path and of the builder (if it is a host file)."""
        record = {"hostPaths": {p: self.path(p) for p in host_paths}}
        if builder.startswith("/"):
            record["builder"] = {"path": builder, "digest": self.file(builder)}
        self._save()
        return record


_PSEUDO_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
              "pstore", "bpf", "mqueue", "hugetlbfs", "configfs", "fusectl", "binfmt_misc", "autofs", "efivarfs",
              "rpc_pipefs", "nsfs"}


def _pseudo_mounts() -> set[str]:
    """Mount points of kernel pseudo filesystems, from /proc/self/mountinfo."""
    mounts = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype in _PSEUDO_FS:
                    mounts.add(fields[4].replace("\\040", " "))
    except (OSError, ValueError, IndexError):
        pass
    return mounts


_HOST_INFO: dict | None = None


def host_info() -> dict:
    """Static facts about this machine for build records (read once per process)."""
    global _HOST_INFO
    if _HOST_INFO is None:
        _HOST_INFO = _read_host_info()
    return dict(_HOST_INFO)


def _read_host_info() -> dict:
    uname = os.uname()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    os_release = ""
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
            os_release = fields.get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    return {
        "hostname": uname.nodename,
        "kernel": f"{uname.sysname} {uname.release}",
        "machine": uname.machine,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "os": os_release,
    }


def digest_json(obj) -> str:
    return blake3.blake3(json.dumps(obj, sort_keys=True).encode()).hexdigest()
