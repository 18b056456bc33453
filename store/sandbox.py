"""The build sandbox: one ``bwrap`` process per build (``spec/sandbox.md``).

Inside, a build sees exactly: its inputs' closures read-only at their logical store
paths, its host paths read-only, a writable per-build store directory where it creates
its outputs, ``/build`` as cwd, ``/proc``, a minimal ``/dev``, and the contract's
environment. It runs in fresh user, mount, pid, network, ipc, uts and cgroup namespaces
as uid 1000 / gid 100 with hostname ``localhost`` and no capabilities.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from .errors import BuildError

BUILD_UID = 1000
BUILD_GID = 100
BUILD_DIR = "/build"


def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise BuildError("bubblewrap (bwrap) is not installed", "apt-get install bubblewrap")
    return path


@dataclass
class SandboxSpec:
    """Everything one sandboxed build needs; ``command()`` turns it into a bwrap argv."""

    store_dir: str
    scratch_store: str  # physical dir bound read-write at store_dir; outputs appear here
    build_dir: str  # physical dir bound at /build (or ``build_mount``)
    closure: list[tuple[str, str]]  # (physical, logical) paths bound read-only
    host_paths: list[str]
    env: list[tuple[str, str]]  # in the order the build's environ should have them
    builder: str
    args: list[str]
    hostname: str = "localhost"
    uid: int = BUILD_UID
    gid: int = BUILD_GID
    build_mount: str = BUILD_DIR
    build_tmpfs: bool = False  # a fresh tmpfs at build_mount instead of binding build_dir
    store_root: str | None = None  # the physical root: hidden if a host path holds it
    extra: list[str] = field(default_factory=list)

    def command(self, data_fds: dict[str, int] | None = None) -> list[str]:
        """bwrap's argv. ``data_fds``: for each path of :data:`MASKED_PROC`, a readable fd
        holding its contents (``--ro-bind-data``; see :func:`masked_proc_fds`)."""
        argv = [
            bwrap_path(),
            "--unshare-all", "--unshare-user",
            "--die-with-parent", "--new-session",
            "--uid", str(self.uid), "--gid", str(self.gid),
            "--hostname", self.hostname,
            "--clearenv",
        ]
        for host in self.host_paths:
            if os.path.islink(host):
                argv += ["--symlink", os.readlink(host), host]
            elif os.path.exists(host):
                argv += ["--ro-bind", host, host]
        for hidden in hidden_roots(self.host_paths, [self.store_root] if self.store_root else []):
            # a host path such as /home holds the store's physical root: the build would see
            # every store path, its database and its keys. An empty directory there instead
            # (writable, as the logical store directory may have to be made inside it; what
            # is written there is discarded). The binds below take their sources from the
            # host, unhidden.
            argv += ["--tmpfs", hidden]
        argv += ["--bind", self.scratch_store, self.store_dir]
        for physical, logical in self.closure:
            if os.path.islink(physical):
                # a store path that is a symlink is one inside too; --ro-bind would follow it
                # and show the build whatever it points to on this host
                argv += ["--symlink", os.readlink(physical), logical]
            else:
                argv += ["--ro-bind", physical, logical]
        # A tmpfs build directory lists entries in another order than the store's
        # filesystem does: the --vary directory-order lever (spec/reproducibility.md).
        build = ["--tmpfs", self.build_mount] if self.build_tmpfs else ["--bind", self.build_dir, self.build_mount]
        argv += [
            *build,
            "--proc", "/proc", "--dev", "/dev",
        ]
        for path in PROC_READ_ONLY:  # bound from the host's procfs: see PROC_READ_ONLY
            argv += ["--ro-bind-try", path, path]
        argv += ["--chdir", self.build_mount]
        for path, fd in (data_fds or {}).items():
            argv += ["--ro-bind-data", str(fd), path]
        for key, value in self.env:
            argv += ["--setenv", key, value]
        argv += self.extra
        argv += ["--remount-ro", "/", "--", self.builder, *self.args]  # the sandbox root tmpfs: read-only
        return argv


def host_view(mount_point: str) -> list[str]:
    """bwrap arguments showing the host's filesystem at the same paths, with room for a
    mount at ``mount_point`` (``fimio run``'s view of the store at its logical directory).

    When ``mount_point`` exists, the host's / is bound whole. Else bwrap would have to
    create it on the host, which only root may do (and should not): each directory from /
    down to its deepest existing ancestor is rebuilt instead from binds of its entries, so
    the missing part is made in bwrap's own tmpfs. Only those few directories differ from
    the host (new files there are not kept; entries that cannot be listed are not shown)."""
    if os.path.isdir(mount_point):
        return ["--dev-bind", "/", "/"]
    args: list[str] = []
    directory = "/"
    for part in mount_point.strip("/").split("/"):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = []
        for name in names:
            entry = os.path.join(directory, name)
            if name == part:
                continue
            if os.path.islink(entry):
                args += ["--symlink", os.readlink(entry), entry]
            else:
                args += ["--dev-bind", entry, entry]
        directory = os.path.join(directory, part)
        if os.path.islink(directory) or not os.path.isdir(directory):
            break  # missing from here down: made in the tmpfs by the mount that follows
        args += ["--dir", directory]
    return args


def hidden_roots(host_paths, dirs) -> list[str]:
    """Where ``dirs`` (real paths: the store's physical root) appear inside the host paths
    that hold them, spelled as each host path is (bound under its own name: ``/home/u``
    with ``/home -> /var/home``)."""
    hidden = []
    for host in host_paths if dirs else ():
        if os.path.islink(host):
            continue  # recreated as a symlink, not bound: what it points to is bound, or absent
        real = os.path.realpath(host).rstrip("/")
        hidden += [host.rstrip("/") + d[len(real):] for d in dirs if d == real or d.startswith(real + "/")]
    return list(dict.fromkeys(hidden))


# The procfs entries that change the host, not the sandbox: kernel settings, the SysRq
# trigger, IRQ affinity, PCI and filesystem knobs. The build's user is mapped to whoever runs
# fimio, so when that is root their owner checks would let a build write them (as Docker,
# they are made read-only). Bound from the host's procfs read-only: /proc/sys shows each
# reader the values of its own namespaces (its hostname, its network), whoever mounted it.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")

# What procfs shows of the host that is the same for every build on one machine, and so a
# silent difference between machines: their fixed contents inside every sandbox.
MASKED_PROC = {
    "/proc/sys/kernel/random/boot_id": b"00000000-0000-0000-0000-000000000000\n",
    "/proc/cmdline": b"\n",
    "/proc/keys": b"",
}


def masked_proc_fds() -> dict[str, int]:
    """A pipe per :data:`MASKED_PROC` path, holding its contents, for ``--ro-bind-data``;
    the caller passes them to bwrap and closes them after it starts."""
    fds = {}
    for path, data in MASKED_PROC.items():
        r, w = os.pipe()
        os.write(w, data)  # a few bytes: within any pipe buffer
        os.close(w)
        fds[path] = r
    return fds


def builder_visible(builder: str, host_paths: list[str], closure_logical: list[str]) -> bool:
    """Whether an absolute builder path will exist inside the sandbox."""
    if not builder.startswith("/"):
        return True  # resolved through PATH inside; the build reports it if missing
    for prefix in [*host_paths, *closure_logical]:
        if builder == prefix or builder.startswith(prefix.rstrip("/") + "/"):
            return True
    return False


def fs_type(path: str) -> str:
    """The filesystem type (``ext4``, ``tmpfs``...) holding ``path``, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mount = fields[4].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[sep + 1]
    except (OSError, ValueError, IndexError):
        pass
    return kind
