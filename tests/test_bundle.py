"""Bundles (``spec/bundle.md``), through the real console script.

* the pinned vectors: ``simple.bundle`` imports to the pinned path and root; exporting the
  vector tree with the vector key gives the pinned record stream; every
  ``hostile-*.bundle`` is refused;
* air-gapped transfer: ``export --with-sources`` / ``--sources-only`` of the example graph,
  ``import`` on a fresh store inside ``unshare -n``, ``realise --offline``: bit-identical,
  with a full rebuild for ``--sources-only``;
* hostile input (flipped bytes, truncation, trailing data, traversal names, size lies,
  untrusted or no signature): exit 4 and the store exactly as it was (no new entry in
  ``store/``, ``.links`` or ``tmp/``, same ``path-info -r``);
* idempotence, missing references (exit 5), flat memory on a large import.
"""

from __future__ import annotations

import io
import json
import os
import time
import pathlib
import subprocess
import sys

import pytest

from conftest import Fimio, assert_one_error_line, fimio_env, fimio_executable, run_on_terminal
from offlinefixtures import REPO, digests, snapshot, write_config
from test_offline import UNSHARE, needs_unshare, online  # noqa: F401  (online: the module fixture)

VECTORS = REPO / "spec" / "vectors" / "bundle"
V = json.loads((VECTORS / "vectors.json").read_text())


@pytest.fixture
def trusting(tmp_path) -> dict:
    """The env of a machine that trusts the vector key."""
    return {"FIMIO_CONFIG": write_config(tmp_path / "trust.toml", trusted_public_keys=[V["publicKey"]])}


@pytest.fixture
def vector_key(tmp_path) -> str:
    path = tmp_path / "vector.secret"
    path.write_text(V["secretKey"] + "\n")
    return str(path)


def _populated(tmp_path, env) -> Fimio:
    """A store holding something already (the vector path), so 'unchanged' means something."""
    cli = Fimio(tmp_path / "root")
    cli("import", VECTORS / "simple.bundle", env=env, check=0)
    return cli


# ---- vectors --------------------------------------------------------------------------------


def test_simple_vector_imports_to_pinned_path(tmp_path, trusting):
    cli = Fimio(tmp_path / "root")
    out = json.loads(cli.out("import", "--json", VECTORS / "simple.bundle", env=trusting))
    assert [p["path"] for p in out["paths"]] == [V["simple"]["path"]]
    assert out["imported"] == 1 and out["signedBy"] == ["vector-1"]
    assert digests(cli, [V["simple"]["path"]]) == {V["simple"]["path"]: V["simple"]["root"]}
    cli("verify", "--check-contents", check=0)
    # the tree came through: an executable, a symlink, an empty file, shared content
    p = cli.physical_store / V["simple"]["path"].rsplit("/", 1)[1]
    assert os.access(p / "run", os.X_OK) and os.readlink(p / "link") == "a.txt"
    assert (p / "empty").read_bytes() == b"" and (p / "b.txt").read_text() == "hello\n"
    assert os.stat(p / "a.txt").st_ino == os.stat(p / "b.txt").st_ino  # deduplicated
    assert os.listdir(cli.root / "tmp") == []


def test_export_of_vector_tree_reproduces_pinned_stream(tmp_path, vector_key):
    sys.path.insert(0, str(VECTORS))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(VECTORS))
    src = tmp_path / "vector-tree"
    make_vectors.write_tree(str(src), make_vectors.TREE)
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", src)
    out = json.loads(cli.out("export", path, "-o", tmp_path / "again.bundle", "--key", vector_key, "--json"))
    assert [p["path"] for p in out["paths"]] == [V["simple"]["path"]]
    assert make_vectors.stream_digest(str(tmp_path / "again.bundle")) == V["simple"]["stream"]
    assert make_vectors.stream_digest(str(VECTORS / "simple.bundle")) == V["simple"]["stream"]


@pytest.mark.parametrize("vector", V["hostile"], ids=lambda v: v["file"])
def test_hostile_vectors_are_refused(tmp_path, trusting, vector):
    cli = _populated(tmp_path, trusting)
    before = snapshot(cli)
    proc = cli("import", VECTORS / vector["file"], env=trusting)
    assert_one_error_line(proc, 4)
    assert snapshot(cli) == before, vector["why"]


# ---- damaged bundles -----------------------------------------------------------------------


@pytest.fixture
def bundle_bytes() -> bytes:
    return (VECTORS / "simple.bundle").read_bytes()


def _refused(tmp_path, env, data: bytes, name: str, code: int = 4):
    cli = Fimio(tmp_path / "root")
    cli("add", VECTORS / "make_vectors.py", check=0)  # something already in the store
    before = snapshot(cli)
    f = tmp_path / name
    f.write_bytes(data)
    proc = cli("import", f, env=env)
    assert_one_error_line(proc, code)
    assert snapshot(cli) == before
    return proc


@pytest.mark.parametrize("where", [0, 5, 14, 15, 16, 20, 1 / 3, 1 / 2, 2 / 3, -40, -20, -5, -1])
def test_flipped_byte_is_refused(tmp_path, trusting, bundle_bytes, where):
    data = bytearray(bundle_bytes)
    offset = where if isinstance(where, int) else int(len(data) * where)
    data[offset] ^= 0x20
    _refused(tmp_path, trusting, bytes(data), "flipped.bundle")


def test_every_single_bit_flip_in_the_trailer_is_refused(tmp_path, bundle_bytes):
    """The trailer is the one part of a bundle its digest does not cover: it must have no
    slack -- not a letter's case in a digest, not the unused bits of a signature's base64,
    not a space. Every flip of every bit of it (and of its length field) is refused."""
    import io

    from fimio.store.bundle_import import import_bundle
    from fimio.store.cache.keys import TrustedKeys
    from fimio.store.errors import IntegrityError
    from fimio.store.local import LocalStore

    end_marker = bundle_bytes.rfind(b"\x00\x00\x00\x00")  # the END chunk head precedes the trailer
    start = end_marker + 4
    trailer_length = int.from_bytes(bundle_bytes[start:start + 4], "little")
    assert start + 4 + trailer_length == len(bundle_bytes)
    trusted = TrustedKeys([V["publicKey"]])
    store = LocalStore(str(tmp_path / "root"), "/fimio/store")
    try:
        accepted = []
        for offset in range(start, len(bundle_bytes)):
            for bit in range(8):
                data = bytearray(bundle_bytes)
                data[offset] ^= 1 << bit
                try:
                    import_bundle(store, io.BytesIO(bytes(data)), trusted)
                    accepted.append((offset - start, bit))
                except IntegrityError:
                    pass
        assert accepted == [] and store.all_paths() == []
    finally:
        store.close()


@pytest.mark.parametrize("length", [0, 1, 14, 15, 16, 30, 1 / 4, 1 / 2, 3 / 4, -30, -10, -1])
def test_truncated_bundle_is_refused(tmp_path, trusting, bundle_bytes, length):
    n = length if isinstance(length, int) else int(len(bundle_bytes) * length)
    _refused(tmp_path, trusting, bundle_bytes[:n], "truncated.bundle")


def test_trailing_data_is_refused(tmp_path, trusting, bundle_bytes):
    _refused(tmp_path, trusting, bundle_bytes + b"\0" * 16, "trailing.bundle")
    _refused(tmp_path, trusting, bundle_bytes + bundle_bytes[15:], "twice.bundle")


def test_untrusted_or_unsigned_bundles_are_refused(tmp_path, bundle_bytes):
    nobody = {"FIMIO_CONFIG": write_config(tmp_path / "none.toml")}
    proc = _refused(tmp_path, nobody, bundle_bytes, "simple.bundle")
    assert "no signature by a trusted key" in proc.stderr
    other = {"FIMIO_CONFIG": write_config(tmp_path / "other.toml", trusted_public_keys=[V["untrustedPublicKey"]])}
    _refused(tmp_path, other, bundle_bytes, "simple.bundle")


def test_unsigned_export_is_refused_unless_sigs_are_not_required(tmp_path, trusting):
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", VECTORS / "make_vectors.py")
    proc = cli("export", path, "-o", tmp_path / "u.bundle", check=0)
    assert "exporting unsigned" in proc.stderr
    other = Fimio(tmp_path / "other")
    before = snapshot(other)
    assert_one_error_line(other("import", tmp_path / "u.bundle", env=trusting), 4, "no signature")
    assert snapshot(other) == before
    other("import", "--no-check-sigs", tmp_path / "u.bundle", env=trusting, check=0)
    relaxed = {"FIMIO_CONFIG": write_config(tmp_path / "relaxed.toml", require_sigs=False)}
    Fimio(tmp_path / "third")("import", tmp_path / "u.bundle", env=relaxed, check=0)


def test_not_a_bundle_and_missing_file(tmp_path, trusting):
    _refused(tmp_path, trusting, b"just some text\n" * 4, "text.bundle")
    cli = Fimio(tmp_path / "root")
    assert_one_error_line(cli("import", tmp_path / "nope.bundle", env=trusting), 5, "does not exist")


# ---- import semantics -----------------------------------------------------------------------


def test_import_is_idempotent(tmp_path, trusting):
    cli = Fimio(tmp_path / "root")
    cli("import", VECTORS / "simple.bundle", env=trusting, check=0)
    first = snapshot(cli)
    out = json.loads(cli.out("import", "--json", VECTORS / "simple.bundle", env=trusting))
    assert out["imported"] == 0 and [p["imported"] for p in out["paths"]] == [False]
    assert snapshot(cli) == first


def test_missing_references_exit_5_and_closure_fixes_it(tmp_path, store, vector_key, trusting):
    lib = store.add_path(str(VECTORS / "make_vectors.py"), "lib.py")
    note = store.add_text("note.txt", b"uses " + store.logical(lib.path).encode(), [lib.path])
    logical = store.logical(note.path)
    store.close()
    cli = Fimio(tmp_path / "root")
    cli("export", logical, "-o", tmp_path / "alone.bundle", "--key", vector_key, check=0)
    cli("export", logical, "-o", tmp_path / "closure.bundle", "--closure", "--key", vector_key, check=0)
    other = Fimio(tmp_path / "other")
    before = snapshot(other)
    proc = other("import", tmp_path / "alone.bundle", env=trusting, check=5)
    assert store.logical(lib.path) in proc.stderr
    assert snapshot(other) == before
    out = json.loads(other.out("import", "--json", tmp_path / "closure.bundle", env=trusting))
    assert [p["path"] for p in out["paths"]] == [store.logical(lib.path), logical]  # references first


def test_export_errors(tmp_path, online, vector_key):
    cli = Fimio(tmp_path / "root")
    cli("verify", check=0)  # an empty store
    # outputs that were never built: exit 5 naming each
    proc = cli("export", *online.targets, "-o", tmp_path / "x.bundle", "--key", vector_key, env=online.env)
    assert proc.returncode == 5
    for p in online.outputs:
        assert p in proc.stderr
    assert not (tmp_path / "x.bundle").exists()
    path = cli.out("add", VECTORS / "make_vectors.py")
    proc = cli("export", path, "-o", tmp_path / "no" / "such" / "dir.bundle", "--key", vector_key)
    assert_one_error_line(proc, 2)
    (tmp_path / "a-dir").mkdir()
    proc = cli("export", path, "-o", tmp_path / "a-dir", "--key", vector_key)
    assert_one_error_line(proc, 2, "is a directory")
    assert os.listdir(tmp_path / "a-dir") == [] and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert_one_error_line(cli("export", path, "-o", tmp_path / "x.bundle", "--key", tmp_path / "nokey"), 2)


@pytest.mark.parametrize("damage", ["small-flipped", "large-flipped", "large-truncated", "large-grown"])
def test_export_refuses_a_damaged_local_store(tmp_path, vector_key, damage):
    """Every blob is checked as it is read, a large one (several frames) across its pieces:
    damage is exit 4 in one line, and no bundle is left under the output name."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small.txt").write_text("small content\n" * 100)
    (tree / "large.bin").write_bytes(os.urandom(9 << 20) + b"tail")
    cli = Fimio(tmp_path / "root")
    path = pathlib.Path(cli.out("add", tree))
    victim = path / ("small.txt" if damage.startswith("small") else "large.bin")
    os.chmod(victim, 0o644)  # the store's file shares its inode with .links
    with open(victim, "r+b") as f:
        if damage.endswith("flipped"):
            f.seek(os.path.getsize(victim) - 2)
            last = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([last[0] ^ 1]))
        elif damage.endswith("truncated"):
            f.truncate(5 << 20)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"more")
    out = tmp_path / "x.bundle"
    proc = cli("export", path, "-o", out, "--key", vector_key)
    assert_one_error_line(proc, 4)
    assert "damaged" in proc.stderr
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith("x.bundle")] == []


@pytest.mark.parametrize("level", ["-7", "1", "19"])
def test_any_level_round_trips(tmp_path, vector_key, trusting, level):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "text").write_text("compressible line\n" * 50_000)
    (tree / "noise").write_bytes(os.urandom(6 << 20))
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", tree)
    cli("export", path, "-o", tmp_path / "b.bundle", "--key", vector_key, "--level", level, check=0)
    other = Fimio(tmp_path / "other")
    other("import", tmp_path / "b.bundle", env=trusting, check=0)
    logical = "/fimio/store/" + os.path.basename(path)
    assert digests(other, [logical]) == digests(cli, [logical])


# ---- air-gapped transfer of the example graph ------------------------------------------------


@needs_unshare
@pytest.mark.parametrize("mode", ["--with-sources", "--sources-only"])
def test_airgapped_transfer_of_example_graph(online, tmp_path, mode):
    bundle = tmp_path / "graph.bundle"
    out = json.loads(online.ref.out("export", *online.targets, mode, "--with-logs", "-o", bundle, "--json",
                                    env=online.env))
    exported = {p["path"] for p in out["paths"]}
    assert set(online.drvs) <= exported and online.fod_output in exported
    assert (set(online.outputs) <= exported) == (mode == "--with-sources")
    cli = Fimio(tmp_path / "airgapped")
    imported = json.loads(cli.out("import", "--json", bundle, env=online.offline_env, prefix=UNSHARE))
    assert imported["imported"] == len(out["paths"]) and imported["realisations"] >= 1
    proc = cli("realise", "--offline", "--json", "--no-out-link", *online.drvs, env=online.offline_env,
               prefix=UNSHARE, check=0)
    result = json.loads(proc.stdout)
    if mode == "--sources-only":
        assert set(result["built"]) == online.regular, "a full rebuild, nothing substituted"
    else:
        assert result["built"] == []
        for drv in online.drvs:  # logs and build records came along
            cli("log", drv, check=0)
            assert json.loads(cli.out("provenance", "--json", drv))["groups"][0]["records"]
    assert result["substituted"] == []
    # with --sources-only every output of the graph was rebuilt; else the targets' outputs came
    wanted = online.all_outputs if mode == "--sources-only" else online.outputs
    assert digests(cli, wanted) == {p: online.digests[p] for p in wanted}
    # the derivation files work offline too (sources re-added from the files)
    again = json.loads(cli.out("realise", "--offline", "--json", "--no-out-link", *online.targets,
                               env=online.offline_env, prefix=UNSHARE))
    assert again["built"] == [] and [t["drvPath"] for t in again["targets"]] == online.drvs


def test_sources_of_a_store_path_target_mean_its_derivation_s(online, tmp_path):
    """An output given as a store path stands for its derivation: --sources-only leaves the
    output out, as for a derivation target; a deriver that is not valid here is named."""
    out_path = online.outputs[0]
    as_path = json.loads(online.ref.out("export", out_path, "--sources-only", "-o", tmp_path / "p.bundle", "--json",
                                        env=online.env))
    assert out_path not in {p["path"] for p in as_path["paths"]}
    assert any(p["path"].endswith(".drv") for p in as_path["paths"])
    # a store that holds the output but not its derivation
    elsewhere = Fimio(tmp_path / "elsewhere")
    bundle = tmp_path / "only-output.bundle"
    online.ref.out("export", out_path, "-o", bundle, env=online.env)
    elsewhere.out("import", bundle, env=online.env)
    for mode in ("--sources-only", "--with-sources"):
        proc = elsewhere("export", out_path, mode, "-o", tmp_path / "x.bundle", env=online.env)
        assert proc.returncode == 5 and "its derivation" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.bundle").exists()


# ---- memory --------------------------------------------------------------------------------


def test_import_memory_stays_flat(tmp_path, vector_key, trusting):
    """A 512 MiB file plus many small ones: export and import peak RSS well under 150 MB."""
    tree = tmp_path / "tree"
    (tree / "small").mkdir(parents=True)
    with open(tree / "large.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(512):
            f.write(block[i:] + block[:i])  # distinct, incompressible megabytes
    for i in range(3000):
        (tree / "small" / f"f{i}.txt").write_text(f"file {i}\n" * (i % 50 + 1))
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", tree)
    bundle = tmp_path / "big.bundle"
    rss_export = _peak_rss(cli.root, ["export", path, "-o", str(bundle), "--key", vector_key, "-q"], {})
    other = tmp_path / "other"
    rss_import = _peak_rss(other, ["import", str(bundle), "-q"], trusting)
    print(f"peak RSS: export {rss_export / 1e6:.0f} MB, import {rss_import / 1e6:.0f} MB")
    assert rss_import < 150e6, f"import peak RSS {rss_import / 1e6:.0f} MB"
    assert rss_export < 300e6, f"export peak RSS {rss_export / 1e6:.0f} MB"
    logical = "/fimio/store/" + os.path.basename(path)
    assert digests(Fimio(other), [logical]) == digests(cli, [logical])


# A process forked from a large one starts with that one's resident size as its peak (the
# kernel carries it over fork and exec): the command is therefore started by a small
# interpreter, which reports the command's own peak, not this test process's size.
_RSS_PROBE = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss * 1024)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _peak_rss(root: pathlib.Path, args: list[str], env: dict) -> int:
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, fimio_executable(), *args], env=fimio_env(root, env),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_export_and_import_show_progress_on_a_terminal_and_nowhere_else(tmp_path, vector_key, trusting):
    src = tmp_path / "tree"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", src)
    bundle = tmp_path / "t.bundle"
    code, _, shown = run_on_terminal(["export", path, "-o", bundle, "--key", vector_key], cli.root)
    assert code == 0
    # a bar, redrawn in place, then erased before the result line
    assert "\rexporting 1 path(s) [" not in shown  # each redraw clears the line first
    assert "\r\x1b[Kexporting 1 path(s) [" in shown and "% " in shown and " / 1.9 MiB" in shown
    assert shown.rindex("\r\x1b[K") > shown.rindex("exporting 1 path(s) [")
    assert shown.rstrip().endswith(f"in {bundle})")

    other = Fimio(tmp_path / "other")
    code, out, shown = run_on_terminal(["import", bundle], other.root, env=trusting)
    assert code == 0 and out.strip() == str(other.physical_store / os.path.basename(path))
    assert "\r\x1b[Kimporting [" in shown and shown.rindex("\r\x1b[K") > shown.rindex("importing [")

    # not with -q, and never where stderr is no terminal
    code, _, shown = run_on_terminal(["-q", "export", path, "-o", bundle, "--key", vector_key], cli.root)
    assert code == 0 and shown == ""
    assert "\r" not in cli("export", path, "-o", bundle, "--key", vector_key, check=0).stderr
    assert "\r" not in Fimio(tmp_path / "third")("import", bundle, env=trusting, check=0).stderr


def test_export_to_stdout_and_import_from_stdin(tmp_path, vector_key, trusting):
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", VECTORS / "make_vectors.py")
    data = cli("export", path, "-o", "-", "--key", vector_key, text=False, check=0).stdout
    assert data.startswith(b"fimio-bundle-1\n")
    other = Fimio(tmp_path / "other")
    proc = other("import", "-", input=data, env=trusting, check=0)
    assert proc.stdout.decode().strip() == str(other.physical_store / os.path.basename(path))
    assert_one_error_line(other("import", "-", input=data[:-3], env=trusting), 4)
    # --json would follow the bundle on stdout: refused before anything is written
    proc = cli("export", path, "-o", "-", "--json", "--key", vector_key, text=False)
    assert_one_error_line(proc, 2, "--json and -o -")
    assert proc.stdout == b""


def test_shared_blobs_executable_variants_and_single_file_paths(tmp_path, vector_key, trusting):
    """One content as a plain and an executable file, in one path and across paths, a blob
    the importing store already has, single-file and symlink paths: all placed right."""
    a = tmp_path / "a"
    (a / "d").mkdir(parents=True)
    for name, mode in (("plain", 0o644), ("exec", 0o755), ("d/plain2", 0o644), ("d/exec2", 0o755)):
        (a / name).write_text("same bytes\n")
        os.chmod(a / name, mode)
    (a / "empty").write_text("")
    b = tmp_path / "b"
    b.mkdir()
    (b / "only-exec").write_text("same bytes\n")
    os.chmod(b / "only-exec", 0o755)
    (b / "known").write_text("the importer has this one\n")
    single = tmp_path / "single.txt"
    single.write_text("same bytes\n")
    link = tmp_path / "link"
    os.symlink("/fimio/store/somewhere", link)
    cli = Fimio(tmp_path / "root")
    paths = [cli.out("add", p) for p in (a, b, single, link)]
    bundle = tmp_path / "mix.bundle"
    cli("export", *paths, "-o", bundle, "--key", vector_key, check=0)
    other = Fimio(tmp_path / "other")
    other("add", b / "known", check=0)  # its blob is in .links already
    other("import", bundle, env=trusting, check=0)
    other("verify", "--check-contents", check=0)
    logical = ["/fimio/store/" + os.path.basename(p) for p in paths]
    assert digests(other, logical) == digests(cli, logical)
    pa = other.physical_store / os.path.basename(paths[0])
    assert os.stat(pa / "plain").st_ino == os.stat(pa / "d" / "plain2").st_ino
    assert os.stat(pa / "exec").st_ino == os.stat(pa / "d" / "exec2").st_ino
    assert os.stat(pa / "plain").st_ino != os.stat(pa / "exec").st_ino
    pb = other.physical_store / os.path.basename(paths[1])
    assert os.stat(pb / "only-exec").st_ino == os.stat(pa / "exec").st_ino  # across paths
    for p in (pa, pa / "d", pa / "plain", pa / "exec", pb / "only-exec"):
        st = os.lstat(p)
        assert st.st_mtime == 1 and st.st_mode & 0o777 in (0o444, 0o555), p
    assert os.lstat(pa / "exec").st_mode & 0o777 == 0o555
    links = set(os.listdir(other.physical_store / ".links"))
    h = __import__("blake3").blake3(b"same bytes\n").hexdigest()
    assert {h, h + "x"} <= links
    assert os.listdir(other.root / "tmp") == []


@pytest.mark.parametrize("after", [0.15, 0.4, 0.8])
def test_killed_import_leaves_nothing_valid_or_half_written(tmp_path, vector_key, trusting, after):
    import signal
    import time

    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    with open(tree / "large.bin", "wb") as f:
        for i in range(96):
            f.write(os.urandom(1 << 20))
    for i in range(2000):
        (tree / "many" / f"f{i}").write_text(f"{i}\n" * 30)
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", tree)
    bundle = tmp_path / "b.bundle"
    cli("export", path, "-o", bundle, "--key", vector_key, check=0)
    other = Fimio(tmp_path / "other")
    other("add", VECTORS / "make_vectors.py", check=0)
    proc = subprocess.Popen([fimio_executable(), "import", str(bundle)], env=fimio_env(other.root, trusting),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logical = "/fimio/store/" + os.path.basename(path)
    valid = other("path-info", logical).returncode == 0
    out = other("verify", "--check-contents", check=0)
    assert "no problems" in out.stdout + out.stderr
    assert os.listdir(other.root / "tmp") == []  # verify removed the dead importer's trees
    names = set(os.listdir(other.physical_store))
    assert (os.path.basename(path) in names) == valid
    if not valid:  # and the import can simply be run again
        other("import", bundle, env=trusting, check=0)
    assert digests(other, [logical]) == digests(cli, [logical])


def test_large_blob_already_here_is_only_checked(tmp_path, vector_key, trusting):
    """A large (streamed) blob that .links already holds while its path is not valid."""
    tree = tmp_path / "t"
    tree.mkdir()
    big = os.urandom(3 << 20)
    (tree / "big.bin").write_bytes(big)
    (tree / "small").write_text("x\n")
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", tree)
    bundle = tmp_path / "b.bundle"
    cli("export", path, "-o", bundle, "--key", vector_key, check=0)
    other = Fimio(tmp_path / "other")
    (tmp_path / "copy.bin").write_bytes(big)
    other("add", tmp_path / "copy.bin", check=0)  # the blob is in .links, the path is not valid
    other("import", bundle, env=trusting, check=0)
    other("verify", "--check-contents", check=0)
    logical = "/fimio/store/" + os.path.basename(path)
    assert digests(other, [logical]) == digests(cli, [logical])


def test_a_realisation_of_other_contents_than_this_store_holds_is_left_out(tmp_path, vector_key):
    """Two machines built one derivation to different bytes. B holds C's output (imported
    as a path, with no realisation); importing A's output with A's realisation keeps B's
    output and does not record a realisation that names other contents, with a warning."""
    from fimio.store.local import LocalStore

    drv = tmp_path / "noisy.toml"
    drv.write_text('name = "noisy"\nbuilder = "/bin/sh"\nargs = ["-c", "head -c 16 /dev/urandom > $out"]\n'
                   '[env]\nPATH = "/usr/bin:/bin"\n')
    env = {"FIMIO_CONFIG": write_config(tmp_path / "trust.toml", trusted_public_keys=[V["publicKey"]],
                                        secret_key_files=[vector_key])}
    a, b, c = (Fimio(tmp_path / n) for n in "ABC")
    out_a = a.out("realise", "--no-out-link", drv, env=env)
    out_c = c.out("realise", "--no-out-link", drv, env=env)
    assert os.path.basename(out_a) == os.path.basename(out_c)
    assert pathlib.Path(out_a).read_bytes() != pathlib.Path(out_c).read_bytes()
    c("export", out_c, "-o", tmp_path / "c.bundle", env=env, check=0)
    b("import", tmp_path / "c.bundle", env=env, check=0)
    a("export", drv, "-o", tmp_path / "a.bundle", env=env, check=0)

    proc = b("import", "--json", tmp_path / "a.bundle", env=env, check=0)
    assert json.loads(proc.stdout)["realisations"] == 0
    assert "other contents" in proc.stderr and "not recorded" in proc.stderr
    assert (b.physical_store / os.path.basename(out_a)).read_bytes() == pathlib.Path(out_c).read_bytes()
    store = LocalStore(str(tmp_path / "B"), "/fimio/store")
    try:
        assert [r for r in _all_realisations(store) if r["path"] == os.path.basename(out_a)] == []
    finally:
        store.close()


def _all_realisations(store) -> list[dict]:
    from fimio.store.db import loads

    with store.db.read() as txn:
        return [loads(v) for _, v in txn.cursor(db=store.db.dbs["realisations"])]


@pytest.mark.parametrize("size", [300, 9 << 20], ids=["small", "large"])
def test_a_torn_blob_in_the_importing_store_is_replaced_not_reused(tmp_path, vector_key, trusting, size):
    """A ``.links`` name left short by a power cut (spec/local-store.md) must not stand for
    the blob: the bundle's verified bytes are written instead."""
    import blake3

    data = (b"the bytes a power cut tore\n" * (size // 27 + 1))[:size]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(data)
    a, b = Fimio(tmp_path / "A"), Fimio(tmp_path / "B")
    path = a.out("add", tmp_path / "src")
    a("export", path, "-o", tmp_path / "x.bundle", "--key", vector_key, check=0)
    b("add", VECTORS / "vectors.json", check=0)  # a store that has blobs, so it looks them up
    (b.physical_store / ".links" / blake3.blake3(data).hexdigest()).write_bytes(data[:3])
    b("import", tmp_path / "x.bundle", env=trusting, check=0)
    assert (b.physical_store / os.path.basename(path) / "f").read_bytes() == data
    assert b("verify", "--check-contents").returncode == 0


def test_no_binary_output_to_a_terminal(tmp_path, vector_key):
    cli = Fimio(tmp_path / "root")
    path = cli.out("add", VECTORS / "make_vectors.py")
    for args in (["export", path, "-o", "-", "--key", vector_key], ["dump", path]):
        code, _, shown = run_on_terminal(args, cli.root, stdout_too=True)
        assert code == 2 and shown.startswith("fimio: error: refusing to write a binary"), shown
        assert "fimio-bundle" not in shown and "nix-archive" not in shown


def _bundle_of_directories(root, blobs: dict) -> bytes:
    """An unsigned one-path bundle of ``root`` that sends each distinct directory once,
    parents first, as writers must (a directory named twice is sent once)."""
    import io

    from fimio.store.bundle import T_DIR, T_HEADER, T_PATH, BundleWriter, canonical
    from fimio.store.paths import source_path
    from fimio.store.tree import DirNode, FileNode

    sizes: dict = {}

    def size(n):  # the tree's size with shared directories counted each time, computed once each
        if isinstance(n, FileNode):
            return n.size
        if n.digest not in sizes:
            sizes[n.digest] = sum(size(c) for c in n.entries.values() if isinstance(c, (DirNode, FileNode)))
        return sizes[n.digest]

    order, seen, queue = [], set(), [root]
    while queue:
        d = queue.pop(0)
        if d.digest in seen:
            continue
        seen.add(d.digest)
        order.append(d)
        queue.extend(c for c in d.entries.values() if isinstance(c, DirNode))
    path = source_path("/fimio/store", "dag", root.digest).logical("/fimio/store")
    buf = io.BytesIO()
    w = BundleWriter(buf)
    w.record(T_HEADER, canonical({"format": "fimio-bundle", "version": 1, "storeDir": "/fimio/store", "paths": 1}))
    w.record(T_PATH, canonical({"path": path, "root": "blake3:" + root.digest.hex(), "size": size(root),
                                "references": [], "deriver": None, "ca": "source", "node": {"type": "directory"},
                                "signatures": [], "dirs": len(order), "blobs": len(blobs)}))
    for d in order:
        w.record(T_DIR, d.encoding())
    for digest, data in blobs.items():
        w.blob(digest, len(data), [data])
    w.finish([])
    return buf.getvalue()


@pytest.mark.parametrize("shape", ["deep-through-shortcuts", "exponentially-wide"])
def test_a_directory_graph_that_expands_beyond_the_limits_is_refused(tmp_path, shape):
    """Directories are sent once however often they are named, so a small bundle can name a
    tree far deeper than the store allows (a long chain also named from the root at every
    level) or astronomically large (each level naming the next twice): refused (exit 4)."""
    import blake3

    from fimio.store.bundle_import import import_bundle
    from fimio.store.cache.keys import TrustedKeys
    from fimio.store.errors import IntegrityError
    from fimio.store.local import LocalStore
    from fimio.store.tree import DirNode, FileNode

    data = b"leaf\n"
    node = DirNode({b"f": FileNode(blake3.blake3(data).digest(), len(data), False)})
    if shape == "deep-through-shortcuts":
        chain = [node]
        for _ in range(600):
            chain.append(DirNode({b"d": chain[-1]}))
        root, needle = DirNode({f"s{i:03}".encode(): c for i, c in enumerate(chain)}), "deeper than 512"
    else:
        for _ in range(40):
            node = DirNode({b"x": node, b"y": node})
        root, needle = node, "expands to more than"
    bundle = _bundle_of_directories(root, {blake3.blake3(data).digest(): data})
    assert len(bundle) < 1 << 20
    store = LocalStore(str(tmp_path / "root"), "/fimio/store")
    try:
        with pytest.raises(IntegrityError, match=needle):
            import_bundle(store, io.BytesIO(bundle), TrustedKeys(), require_sigs=False)
        assert store.all_paths() == [] and os.listdir(store.tmp) == []
    finally:
        store.close()


def _bomb(path, kind: str, count: int) -> None:
    """An unsigned bundle of ``count`` build records of almost 1 MiB each, or of ``count``
    logs of 255 MiB of zeros: a few hundred KB that decompress to hundreds of MiB."""
    from fimio.store.bundle import RECORD_HEAD, T_HEADER, T_LOG, T_RECORD, BundleWriter, canonical

    def drv_hash(i):  # 32 nix-base32 characters
        return "".join("0123456789abcdfghijklmnpqrsvwxyz"[(i >> 5 * k) & 31] for k in range(32))

    with open(path, "wb") as f:
        w = BundleWriter(f, level=19)
        w.record(T_HEADER, canonical({"format": "fimio-bundle", "version": 1, "storeDir": "/fimio/store", "paths": 0}))
        for i in range(count):
            if kind == "records":
                w.record(T_RECORD, canonical({"drvHash": drv_hash(i), "id": str(i),
                                              "record": {"x": "a" * ((1 << 20) - 200)}}))
            else:
                n = 255 << 20
                w._emit(RECORD_HEAD.pack(T_LOG, 2 + 32 + n) + b"\x20\x00" + drv_hash(i).encode())
                for _ in range(n >> 20):
                    w._emit(bytes(1 << 20))
                w.records += 1
        w.finish([])


@pytest.mark.parametrize("kind, count", [("records", 100), ("logs", 2)])
def test_a_bomb_of_logs_or_records_is_refused_before_it_costs_much(tmp_path, kind, count):
    """Logs and build records are signed by the trailer only, which comes last: an unsigned
    bundle of a few hundred KB must not write or hold hundreds of MiB before it is refused."""
    bundle = tmp_path / f"{kind}.bundle"
    _bomb(bundle, kind, count)
    assert bundle.stat().st_size < 1 << 20
    proc = Fimio(tmp_path / "root")("import", bundle)
    assert_one_error_line(proc, 4, "logs and build records expand to more than")


def test_export_names_every_missing_target(tmp_path):
    cli = Fimio(tmp_path / "root")
    (tmp_path / "f").write_text("f\n")
    here = cli.out("add", tmp_path / "f")
    gone = [f"/fimio/store/{c * 32}-gone" for c in "ab"]
    proc = cli("export", here, *gone, "-o", tmp_path / "x.bundle")
    assert proc.returncode == 5 and "2 item(s) to export are not valid here" in proc.stderr, proc.stderr
    assert all(g in proc.stderr for g in gone) and not (tmp_path / "x.bundle").exists()


def test_ctrl_c_while_importing_from_a_pipe_ends_at_once_and_registers_nothing(tmp_path, vector_key, trusting):
    """Ctrl-C (SIGINT, handled as at a terminal) in the middle of an import from stdin: exit
    130 with one line, nothing registered; what was staged goes with the next command."""
    import signal
    import subprocess

    from conftest import fimio_env, fimio_executable

    src = Fimio(tmp_path / "src")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i}").write_bytes(os.urandom(256 << 10))
    path = src.out("add", tree)
    data = src("export", path, "-o", "-", "--key", vector_key, "--level", "-7", text=False, check=0).stdout
    cli = Fimio(tmp_path / "root")
    proc = subprocess.Popen([fimio_executable(), "import", "-"], env=fimio_env(cli.root, trusting),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write(data[:len(data) // 2])  # the rest never comes
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not any(e.startswith("import-") for e in os.listdir(cli.root / "tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "fimio: error: interrupted", err
    assert time.monotonic() - start < 5, "the import went on after Ctrl-C"
    assert cli("path-info", path).returncode == 5
    cli.out("verify")
    assert os.listdir(cli.root / "tmp") == []


def test_an_import_under_a_restrictive_umask_gives_normal_modes(tmp_path, vector_key, trusting):
    """Blobs are 0444/0555 whatever the importer's umask (as add and substitution give)."""
    src = Fimio(tmp_path / "src")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_text("f\n")
    (tmp_path / "t" / "x").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "t" / "x", 0o755)
    path = src.out("add", tmp_path / "t")
    src.out("export", path, "-o", tmp_path / "t.bundle", "--key", vector_key)
    cli = Fimio(tmp_path / "root")
    imported = pathlib.Path(cli.out("import", tmp_path / "t.bundle", env=trusting,
                                    preexec_fn=lambda: os.umask(0o077)))
    assert [os.stat(imported / n).st_mode & 0o777 for n in ("f", "x")] == [0o444, 0o555]
