"""Derivation files and the canonical ``.drv`` (spec/derivation.md), through the real CLI.

* every kind of bad input: exit 2 and one ``fimio: error: <file>:<line>: ...`` line pointing
  at the offending line;
* instantiate is deterministic and independent of the physical root; the ``.drv`` is
  canonical JSON; realising the ``.drv`` equals realising the TOML;
* the vectors of spec/vectors/derivations/ are pinned, and recomputed here independently
  from the spec's formulas (blake3 + JSON only, no fimio code).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import textwrap

import blake3
import pytest

from conftest import STORE_DIR, assert_one_error_line

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "spec" / "vectors" / "derivations"
SH = 'builder = "/bin/sh"\n'


def write(directory: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# ---- validation: exit 2 and file:line ---------------------------------------------------

# (id, file text, expected line, a phrase the message must contain)
BAD = [
    ("unknown-key", 'name = "x"\n' + SH + "\nfoo = 1\n", 4, "unknown key 'foo'"),
    ("unknown-sandbox-key", 'name = "x"\n' + SH + "[sandbox]\nmemory = 1\n", 4, "unknown key 'memory' in [sandbox]"),
    ("unknown-fetch-key", 'name = "x"\n[fetch]\nurl = "http://h/x"\nhash = "sha256:' + "0" * 64 + '"\nmd5 = "x"\n',
     5, "unknown key 'md5' in [fetch]"),
    ("name-not-string", "name = 5\n" + SH, 1, "'name' must be a string"),
    # 211 characters are a store name, but not with ".drv" (or "-dev") after them
    ("name-too-long-for-drv", f'name = "{"n" * 208}"\n' + SH, 1, "with '.drv' it must fit"),
    ("name-too-long-for-output", f'name = "{"n" * 200}"\n' + SH + 'outputs = ["out", "documentation"]\n', 1,
     "with '-documentation' it must fit"),
    ("args-not-list", 'name = "x"\n' + SH + 'args = "-c true"\n', 3, "'args' must be a list"),
    ("args-not-strings", 'name = "x"\n' + SH + 'args = ["-c", 1]\n', 3, "'args' must be a list of strings"),
    ("builder-not-string", 'name = "x"\nbuilder = ["/bin/sh"]\n', 2, "'builder' must be a string"),
    ("fetch-builder-without-fetch", 'name = "x"\nbuilder = "builtin:fetchurl"\n', 2, "give a [fetch] table"),
    ("builder-empty", 'name = "x"\nbuilder = ""\n', 2, "'builder' must not be empty"),
    ("system-not-string", 'name = "x"\n' + SH + "system = 64\n", 3, "'system' must be a string"),
    ("outputs-not-list", 'name = "x"\n' + SH + 'outputs = "out"\n', 3, "'outputs' must be a list"),
    ("outputs-duplicate", 'name = "x"\n' + SH + 'outputs = ["out", "out"]\n', 3, "distinct"),
    ("outputs-bad-name", 'name = "x"\n' + SH + 'outputs = ["out", "b-in"]\n', 3, "'outputs'"),
    ("outputs-empty", 'name = "x"\n' + SH + "outputs = []\n", 3, "non-empty"),
    ("env-not-table", 'name = "x"\n' + SH + 'env = "A=1"\n', 3, "'env' must be a table"),
    ("timeout-not-int", 'name = "x"\n' + SH + '[sandbox]\ntimeout = "60"\n', 4, "'timeout' must be an integer"),
    ("timeout-negative", 'name = "x"\n' + SH + "[sandbox]\ntimeout = -1\n", 4, ">= 0"),
    ("timeout-bool", 'name = "x"\n' + SH + "[sandbox]\ntimeout = true\n", 4, "'timeout' must be an integer"),
    ("host-paths-relative", 'name = "x"\n' + SH + '[sandbox]\nhost_paths = ["/usr", "bin"]\n', 4, "absolute"),
    ("bad-name-dot", 'name = ".hidden"\n' + SH, 1, "invalid store path name '.hidden'"),
    ("bad-name-space", 'name = "a b"\n' + SH, 1, "invalid store path name 'a b'"),
    ("bad-name-slash", 'name = "a/b"\n' + SH, 1, "invalid store path name"),
    ("missing-name", SH, 1, "missing required key 'name'"),
    ("missing-builder", '# no builder\nname = "x"\nargs = []\n', 1, "missing required key 'builder'"),
    ("bad-env-name", 'name = "x"\n' + SH + '[env]\nOK = "1"\n"1BAD" = "2"\n', 5, "invalid environment variable name '1BAD'"),
    ("bad-env-name-dash", 'name = "x"\n' + SH + '[env]\n"A-B" = "2"\n', 4, "invalid environment variable name 'A-B'"),
    ("env-int", 'name = "x"\n' + SH + '[env]\nA = "1"\nB = 2\n', 5, "'B' must be a string"),
    ("env-bool", 'name = "x"\n' + SH + "[env]\nB = true\n", 4, "'B' must be a string"),
    ("env-list", 'name = "x"\n' + SH + '[env]\nB = ["x"]\n', 4, "'B' must be a string"),
    ("env-reserved-home", 'name = "x"\n' + SH + '[env]\nHOME = "/root"\n', 4, "'HOME' is set by fimio"),
    ("env-reserved-tmpdir", 'name = "x"\n' + SH + '[env]\nTMPDIR = "/tmp"\n', 4, "'TMPDIR' is set by fimio"),
    ("env-reserved-epoch", 'name = "x"\n' + SH + '[env]\nSOURCE_DATE_EPOCH = "0"\n', 4, "'SOURCE_DATE_EPOCH'"),
    ("env-reserved-fimio", 'name = "x"\n' + SH + '[env]\nFIMIO_STORE = "/nix/store"\n', 4, "'FIMIO_STORE'"),
    ("env-reserved-prefix", 'name = "x"\n' + SH + '[env]\nFIMIO_ANYTHING = "1"\n', 4, "'FIMIO_ANYTHING'"),
    ("env-output-name", 'name = "x"\n' + SH + 'outputs = ["out", "dev"]\n[env]\ndev = "/x"\n', 5, "'dev' is set by fimio"),
    ("input-two-kinds", 'name = "x"\n' + SH + '[inputs]\nsrc = { path = "src", store = "/fimio/store/x" }\n',
     4, "input 'src' needs exactly one of path/drv/store"),
    ("input-no-kind", 'name = "x"\n' + SH + '[inputs]\nsrc = { output = "out" }\n', 4, "input 'src' needs exactly one"),
    ("input-output-without-drv", 'name = "x"\n' + SH + '[inputs]\nsrc = { path = "src", output = "dev" }\n',
     4, "'output' only with drv"),
    ("input-two-kinds-subtable", 'name = "x"\n' + SH + '\n[inputs.src]\npath = "src"\ndrv = "a.toml"\n',
     4, "input 'src' needs exactly one"),
    ("input-not-table", 'name = "x"\n' + SH + '[inputs]\nsrc = "src"\n', 4, "input 'src' must be a table"),
    ("input-empty-value", 'name = "x"\n' + SH + '[inputs]\nsrc = { path = "" }\n', 4, "must be a non-empty string"),
    ("input-bad-var", 'name = "x"\n' + SH + '[inputs]\n"my-src" = { path = "src" }\n', 4, "not a valid environment variable"),
    ("input-clashes-env", 'name = "x"\n' + SH + '[env]\nsrc = "1"\n[inputs]\nsrc = { path = "src" }\n', 6, "clashes"),
    ("input-clashes-output", 'name = "x"\n' + SH + '[inputs]\nout = { path = "src" }\n', 4, "clashes"),
    ("input-clashes-path", 'name = "x"\n' + SH + '[inputs]\nPATH = { path = "src" }\n', 4, "clashes"),
    ("missing-source", 'name = "x"\n' + SH + '[inputs]\nok = { path = "." }\nsrc = { path = "no-such-dir" }\n',
     5, "input 'src': 'no-such-dir' does not exist"),
    ("missing-drv-file", 'name = "x"\n' + SH + '\n[inputs]\ndep = { drv = "no-such.toml" }\n',
     5, "input 'dep': derivation file 'no-such.toml' does not exist"),
    ("store-input-garbage", 'name = "x"\n' + SH + '[inputs]\ns = { store = "not a path" }\n', 4, "input 's'"),
    ("store-input-outside", 'name = "x"\n' + SH + '[inputs]\ns = { store = "/usr/bin" }\n', 4, "not in the store"),
    ("toml-syntax", 'name = "x"\n' + SH + 'args = ["-c", "true",,]\n', 3, "invalid TOML"),
    ("toml-syntax-key", 'name = "x"\n' + SH + "\n[env]\nA B = 1\n", 5, "invalid TOML"),
    ("toml-duplicate-key", 'name = "x"\n' + SH + 'name = "y"\n', 3, "invalid TOML"),
    ("toml-unterminated-at-eof", 'name = "x"\n' + SH + "args = [\n", 3, "invalid TOML"),
    ("fetch-bad-hash", 'name = "x"\n\n[fetch]\nurl = "http://h/x"\nhash = "sha256:abc"\n', 5, "[fetch] hash must be"),
    ("fetch-md5", 'name = "x"\n[fetch]\nurl = "http://h/x"\nhash = "md5:' + "0" * 32 + '"\n', 4, "[fetch] hash must be"),
    ("fetch-upper-hex", 'name = "x"\n[fetch]\nurl = "http://h/x"\nhash = "sha256:' + "A" * 64 + '"\n', 4, "[fetch] hash"),
    ("fetch-no-hash", 'name = "x"\n\n[fetch]\nurl = "http://h/x"\n', 3, "[fetch] needs 'hash'"),
    ("fetch-no-url", 'name = "x"\n[fetch]\nhash = "sha256:' + "0" * 64 + '"\n', 2, "[fetch] needs 'url'"),
    ("fetch-bad-url", 'name = "x"\n[fetch]\nurl = "ftp://h/x"\nhash = "sha256:' + "0" * 64 + '"\n', 3, "url must be"),
    ("fetch-with-builder", 'name = "x"\n' + SH + '[fetch]\nurl = "http://h/x"\nhash = "sha256:' + "0" * 64 + '"\n',
     2, "cannot have 'builder'"),
    ("fetch-with-inputs", 'name = "x"\n[inputs]\ns = { path = "." }\n[fetch]\nurl = "http://h/x"\nhash = "sha256:'
     + "0" * 64 + '"\n', 2, "cannot have 'inputs'"),
    # no program can be given a NUL: refused here, never a traceback where the build starts
    ("nul-in-env", 'name = "x"\n' + SH + '[env]\nA = "a\\u0000b"\n', 4, "a NUL character"),
    ("nul-in-args", 'name = "x"\nbuilder = "/bin/sh"\nargs = ["-c", "a\\u0000b"]\n', 3, "a NUL character"),
    ("nul-in-name", 'name = "a\\u0000b"\n' + SH, 1, "invalid store path name 'a\\x00b'"),  # shown escaped
    ("name-too-long", 'name = "' + "n" * 210 + '"\n' + SH, 1, "(shorten the name)"),
    ("nul-in-builder", 'name = "x"\nbuilder = "/bin/sh\\u0000x"\n', 2, "a NUL character"),
    ("nul-in-host-path", 'name = "x"\n' + SH + '[sandbox]\nhost_paths = ["/usr\\u0000"]\n', 4, "'host_paths' must be"),
    # an output is a variable of the build: $HOME would be /homeless-shelter, not the output
    ("output-named-home", 'name = "x"\n' + SH + 'outputs = ["out", "HOME"]\n', 3, "output name 'HOME'"),
    ("output-named-fimio", 'name = "x"\n' + SH + 'outputs = ["FIMIO_STORE"]\n', 3, "output name 'FIMIO_STORE'"),
]


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory):
    """Run ``fimio instantiate`` on every BAD file, four at a time (each in its own root)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import run_fimio

    def one(case):
        ident, text, _, _ = case
        d = tmp_path_factory.mktemp(ident)
        (d / "drvs" / "src").mkdir(parents=True)
        (d / "drvs" / "src" / "f").write_text("x")
        f = d / "drvs" / "bad.toml"
        f.write_text(text)
        proc = run_fimio(["instantiate", f], d / "root")
        drvs = [p for p in os.listdir(d / "root" / "store") if p.endswith(".drv")]
        return ident, (f, proc, drvs)

    tmp_path_factory.getbasetemp()  # made once here: made lazily by racing threads, it could be two
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, BAD))


@pytest.mark.parametrize("ident,line,needle", [(b[0], b[2], b[3]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_derivation_file(bad_results, ident, line, needle):
    f, proc, drvs = bad_results[ident]
    assert_one_error_line(proc, 2, f"{f}:{line}: ", needle)
    assert drvs == []  # nothing but (possibly) sources added before the error is in the store


def test_bad_input_file_reports_the_file_that_is_wrong(cli, tmp_path):
    """An error in a dependency names the dependency's file and line, not the target's."""
    write(tmp_path, "dep.toml", 'name = "dep"\nbuilder = "/bin/sh"\n[env]\nX = 1\n')
    top = write(tmp_path, "top.toml", 'name = "top"\nbuilder = "/bin/sh"\n[inputs]\nd = { drv = "dep.toml" }\n')
    assert_one_error_line(cli("instantiate", top), 2, f"{tmp_path / 'dep.toml'}:4: ", "'X' must be a string")


def test_not_utf8(cli, tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(b'name = "caf\xe9"\nbuilder = "/bin/sh"\n')
    assert_one_error_line(cli("instantiate", f), 2, f"{f}:1: ", "not UTF-8")



def test_a_byte_order_mark_is_named(cli, tmp_path):
    # some editors write one first; TOML has no place for it, and the parser's own message
    # ("Invalid statement") does not say what is wrong
    f = tmp_path / "bom.toml"
    f.write_bytes(b'\xef\xbb\xbfname = "x"\nbuilder = "/bin/sh"\n')
    assert_one_error_line(cli("instantiate", f), 2, f"{f}:1: starts with a byte order mark (BOM)",
                          "save it as UTF-8 without a BOM")

def test_missing_top_level_file_is_not_found(cli, tmp_path):
    """A derivation file named on the command line that does not exist: exit 5 (not found)."""
    f = tmp_path / "nope.toml"
    assert_one_error_line(cli("instantiate", f), 5, "does not exist", str(f))
    assert_one_error_line(cli("realise", "--no-out-link", f), 5, "does not exist")


def test_directory_as_derivation_file(cli, tmp_path):
    (tmp_path / "d.toml").mkdir()
    assert_one_error_line(cli("instantiate", tmp_path / "d.toml"), 2, "is a directory")


def _cycle_files(tmp_path):
    a = write(tmp_path, "a.toml", """
        # a depends on b
        name = "a"
        builder = "/bin/sh"

        [inputs]
        b = { drv = "b.toml" }
        """)
    write(tmp_path, "b.toml", """
        name = "b"
        builder = "/bin/sh"
        [inputs]
        a = { drv = "a.toml" }
        """)
    return a


def test_dependency_cycle_is_bad_input(cli, tmp_path):
    a = _cycle_files(tmp_path)
    line = assert_one_error_line(cli("instantiate", a, cwd=tmp_path), 2, "dependency cycle")
    assert "a.toml -> b.toml -> a.toml" in line
    self_ref = write(tmp_path, "self.toml", 'name = "s"\nbuilder = "/bin/sh"\n[inputs]\ns = { drv = "self.toml" }\n')
    assert_one_error_line(cli("instantiate", self_ref, cwd=tmp_path), 2, "dependency cycle")


def test_dependency_cycle_points_at_the_input_line(cli, tmp_path):
    a = _cycle_files(tmp_path)
    # b.toml line 4 (`a = { drv = "a.toml" }`) closes the cycle a -> b -> a
    assert_one_error_line(cli("instantiate", a), 2, f"{tmp_path / 'b.toml'}:4: ",
                          "dependency cycle: a.toml -> b.toml -> a.toml")


# ---- determinism and canonical form -----------------------------------------------------

def _instantiate_json(cli, *files, **kw) -> list[dict]:
    return json.loads(cli.out("instantiate", "--json", *files, **kw))


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_instantiate_is_deterministic_and_independent_of_the_physical_root(cli, fimio, tmp_path):
    files = [VECTORS / "app.toml", VECTORS / "lib.toml", VECTORS / "fetch.toml"]
    first = _instantiate_json(cli, *files)
    again = _instantiate_json(cli, *files)
    elsewhere = json.loads(fimio(["instantiate", "--json", *files], tmp_path / "x" / "other-root", check=0).stdout)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "physical"} for r in recs]  # noqa: E731
    for recs in (again, elsewhere):
        assert [{**r, "outputs": {n: o["path"] for n, o in r["outputs"].items()}} for r in strip(recs)] == \
               [{**r, "outputs": {n: o["path"] for n, o in r["outputs"].items()}} for r in strip(first)]
    # the bytes of the .drv files are identical too
    for a, b in zip(first, elsewhere):
        assert pathlib.Path(a["physical"]).read_bytes() == pathlib.Path(b["physical"]).read_bytes()
        assert a["physical"] != b["physical"]
    # instantiate prints physical .drv paths, one per line
    out = cli.out("instantiate", *files).splitlines()
    assert out == [r["physical"] for r in first]


def test_formatting_and_comments_do_not_matter_but_content_does(cli, tmp_path):
    base = write(tmp_path / "a", "x.toml", """
        name = "x"
        builder = "/bin/sh"
        args = ["-c", "echo $A > $out"]
        [env]
        A = "1"
        B = "2"
        """)
    reformatted = write(tmp_path / "b", "x.toml", """
        # the same derivation, written differently
        args = [ "-c",
                 "echo $A > $out" ]   # trailing comment
        builder = '/bin/sh'
        name    = "x"

        [env]
        B = "2"
        "A" = "1"
        """)
    (r1,), (r2,) = _instantiate_json(cli, base), _instantiate_json(cli, reformatted)
    assert r1["drvPath"] == r2["drvPath"] and r1["drvHash"] == r2["drvHash"]
    # an explicit default is the same derivation as the implicit one
    explicit = write(tmp_path / "c", "x.toml", base.read_text() + textwrap.dedent("""
        [sandbox]
        host_paths = ["/usr", "/bin", "/lib", "/lib64"]
        timeout = 0
        """) + '\n')
    explicit.write_text(explicit.read_text().replace('name = "x"', 'name = "x"\noutputs = ["out"]'))
    (r3,) = _instantiate_json(cli, explicit)
    assert r3["drvPath"] == r1["drvPath"]
    # any change of content changes the derivation hash and the output paths
    changes = {
        "env": ('B = "2"', 'B = "3"'),
        "args": ("echo $A", "echo  $A"),
        "name": ('name = "x"', 'name = "y"'),
        "system": ('name = "x"', 'name = "x"\nsystem = "riscv64-linux"'),
        "timeout": ('[env]', '[sandbox]\ntimeout = 5\n[env]'),
        "host_paths": ('[env]', '[sandbox]\nhost_paths = ["/usr"]\n[env]'),
    }
    seen = {r1["outputs"]["out"]["path"]}
    for what, (old, new) in changes.items():
        f = tmp_path / what / "x.toml"
        f.parent.mkdir()
        f.write_text(base.read_text().replace(old, new, 1))
        (r,) = _instantiate_json(cli, f)
        assert r["outputs"]["out"]["path"] not in seen, what
        seen.add(r["outputs"]["out"]["path"])


def test_drv_file_is_canonical_json(cli, tmp_path):
    f = write(tmp_path, "u.toml", """
        name = "unicode"
        builder = "/bin/sh"
        args = ["-c", "printf '%s\\\\n' \\"$GREETING\\" > $out\\n# second line\\ttab"]
        outputs = ["out", "doc"]
        [env]
        GREETING = "grüße, 世界 \\u0001"
        ZED = "z"
        ALPHA = "a"
        [inputs]
        src = { path = "src" }
        """)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    (rec,) = _instantiate_json(cli, f)
    data = pathlib.Path(rec["physical"]).read_bytes()
    obj = json.loads(data.decode("utf-8"))
    assert data == _canonical(obj), "not canonical: sorted keys, compact separators, raw UTF-8"
    assert "grüße, 世界".encode() in data and b"\\u0001" in data and b"\\n" in data and b"\\t" in data
    assert not data.endswith(b"\n")
    assert set(obj) == {"fimio", "name", "system", "builder", "args", "env", "outputs", "inputs", "sandbox"}
    assert obj["fimio"] == 1
    assert obj["system"].endswith("-linux")  # the host's system by default
    assert obj["sandbox"] == {"hostPaths": ["/usr", "/bin", "/lib", "/lib64"], "timeout": 0}
    assert set(obj["outputs"]) == {"out", "doc"}
    assert obj["outputs"]["doc"].endswith("-unicode-doc") and obj["outputs"]["out"].endswith("-unicode")
    assert obj["outputs"] == {n: o["path"] for n, o in rec["outputs"].items()}
    (kind, src), = obj["inputs"]["src"].items()
    assert kind == "src" and src.startswith(STORE_DIR + "/") and src.endswith("-src")
    # the .drv is a valid text path in the store referring to its source
    info = json.loads(cli.out("path-info", "--json", rec["physical"]))[0]
    assert info["references"] == [src] and info["ca"] == "text"


def test_store_input_and_sub_table_inputs(cli, tmp_path):
    (tmp_path / "data").write_text("data\n")
    added = cli.out("add", tmp_path / "data")
    logical = STORE_DIR + "/" + os.path.basename(added)
    for i, given in enumerate([logical, added, os.path.basename(added).split("-")[0]]):
        f = write(tmp_path / str(i), "s.toml", f"""
            name = "s"
            builder = "/bin/sh"
            args = ["-c", "cp $d $out"]
            [env]
            PATH = "/usr/bin:/bin"
            [inputs.d]
            store = "{given}"
            """)
        (rec,) = _instantiate_json(cli, f)
        obj = json.loads(pathlib.Path(rec["physical"]).read_bytes())
        assert obj["inputs"] == {"d": {"store": logical}}
    out = cli.out("realise", "--no-out-link", f)
    assert pathlib.Path(out).read_text() == "data\n"


def test_realise_drv_path_equals_realise_toml(cli, tmp_path):
    f = write(tmp_path, "t.toml", """
        name = "t"
        builder = "/bin/sh"
        args = ["-c", "mkdir $out $bin && echo $msg > $out/msg && echo bin > $bin/b"]
        outputs = ["out", "bin"]
        [env]
        PATH = "/usr/bin:/bin"
        msg = "hi"
        """)
    (rec,) = _instantiate_json(cli, f)
    logical = rec["drvPath"]
    hash_part = os.path.basename(logical).split("-")[0]
    from_drv = json.loads(cli.out("realise", "--json", "--no-out-link", logical))
    assert from_drv["built"] == [logical]
    want = {n: o["path"] for n, o in rec["outputs"].items()}
    for target in (f, logical, rec["physical"], hash_part):
        r = json.loads(cli.out("realise", "--json", "--no-out-link", target))
        assert r["built"] == []
        assert {n: o["path"] for n, o in r["targets"][0]["outputs"].items()} == want
        assert r["targets"][0]["drvPath"] == logical
    # the plain output lists every output's physical path
    assert sorted(cli.out("realise", "--no-out-link", logical).splitlines()) == sorted(
        o["physical"] for o in rec["outputs"].values())
    # an output path is not a derivation
    assert_one_error_line(cli("realise", "--no-out-link", rec["outputs"]["out"]["physical"]), 2, "not a derivation")


def test_changing_the_fetch_url_keeps_output_paths(cli, tmp_path):
    """Fixed-output: the URL is in the .drv (its path changes) but not in any output path."""
    shutil.copytree(VECTORS, tmp_path / "v", ignore=shutil.ignore_patterns("*.json", "*.py"))
    before = {r["drvPath"]: r for r in _instantiate_json(cli, tmp_path / "v" / "fetch.toml", tmp_path / "v" / "app.toml")}
    f = tmp_path / "v" / "fetch.toml"
    f.write_text(f.read_text().replace("http://127.0.0.1:1/greeting.txt", "https://mirror.example/g.txt"))
    after = _instantiate_json(cli, f, tmp_path / "v" / "app.toml")
    old = list(before.values())
    for a, b in zip(old, after):
        assert a["drvPath"] != b["drvPath"]  # the .drv text changed (and app's refers to fetch's)
        assert a["drvHash"] == b["drvHash"]
        assert a["outputs"]["out"]["path"] == b["outputs"]["out"]["path"]
    # changing the declared hash changes both
    f.write_text(f.read_text().replace("sha256:96d5", "sha256:06d5"))
    changed = _instantiate_json(cli, f, tmp_path / "v" / "app.toml")
    for a, b in zip(old, changed):
        assert a["outputs"]["out"]["path"] != b["outputs"]["out"]["path"]


def test_drv_with_forged_output_paths_is_refused(cli, tmp_path):
    from fimio.store.derivation import canonical_json
    from fimio.store.local import LocalStore

    honest = write(tmp_path, "h.toml", 'name = "victim"\nbuilder = "/bin/sh"\nargs = ["-c", "echo good > $out"]\n')
    (rec,) = _instantiate_json(cli, honest)
    victim = rec["outputs"]["out"]["path"]
    forged = json.loads(pathlib.Path(rec["physical"]).read_bytes())
    forged["args"] = ["-c", "echo evil > $out"]  # a different build claiming the same output path
    s = LocalStore(str(cli.root), STORE_DIR)
    try:
        info = s.add_text("victim.drv", canonical_json(forged))
        forged_drv = s.logical(info.path)
    finally:
        s.close()
    assert_one_error_line(cli("realise", "--no-out-link", forged_drv), 4, "names output paths")
    assert cli("path-info", victim).returncode == 5
    # the honest derivation still builds its own output there
    assert pathlib.Path(cli.out("realise", "--no-out-link", honest)).read_text() == "good\n"


# ---- pinned vectors --------------------------------------------------------------------

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def _nix32(data: bytes) -> str:
    n = int.from_bytes(data, "little")
    return "".join(NIX32[(n >> (5 * i)) & 31] for i in reversed(range((len(data) * 8 + 4) // 5)))


def _path_hash(kind: str, store_dir: str, name: str, part1: str, part2: str) -> str:
    fp = f"fimio-path-1:{kind}:{store_dir}:{name}:{part1}:{part2}"
    return _nix32(blake3.blake3(fp.encode()).digest()[:20])


def _spec_hash_modulo(obj: dict, drv_hash_of) -> str:
    """spec/derivation.md §4, written from the spec alone."""
    if "fetch" in obj:
        return blake3.blake3(f"fimio-fixed-1:{obj['fetch']['hash']}:{obj['name']}".encode()).hexdigest()
    masked = dict(obj)
    masked["outputs"] = {name: "" for name in obj["outputs"]}
    masked["inputs"] = {
        var: ({"drvHash": drv_hash_of(spec["drv"]), "output": spec["output"]} if "drv" in spec else spec)
        for var, spec in obj["inputs"].items()
    }
    return blake3.blake3(_canonical(masked)).hexdigest()


def test_vectors_are_pinned(cli):
    vec = json.loads((VECTORS / "vectors.json").read_text())
    assert vec["storeDir"] == STORE_DIR
    for name, want in vec["derivations"].items():
        (rec,) = _instantiate_json(cli, VECTORS / name)
        data = pathlib.Path(rec["physical"]).read_bytes()
        assert data == (VECTORS / (name + ".drv.json")).read_bytes(), f"{name}: the .drv bytes changed"
        assert rec["drvPath"] == want["drvPath"], name
        assert rec["drvHash"] == want["drvHash"], name
        assert {n: o["path"] for n, o in rec["outputs"].items()} == want["outputs"], name
        info = json.loads(cli.out("path-info", "--json", rec["physical"]))[0]
        assert info["references"] == want["references"], name
    for src, want in vec["sources"].items():
        info = json.loads(cli.out("path-info", "--json", src))[0]
        assert info["digest"] == "blake3:" + want["rootDigest"]


def test_vectors_follow_the_spec_formulas():
    """Recompute every vector from spec/derivation.md and spec/store-paths.md, without fimio."""
    vec = json.loads((VECTORS / "vectors.json").read_text())
    store_dir = vec["storeDir"]
    by_drv = {d["drvPath"]: (name, d) for name, d in vec["derivations"].items()}
    objs = {name: json.loads((VECTORS / (name + ".drv.json")).read_bytes()) for name in vec["derivations"]}

    def drv_hash_of(drv_path):
        name, _ = by_drv[drv_path]
        return _spec_hash_modulo(objs[name], drv_hash_of)

    for name, want in vec["derivations"].items():
        obj = objs[name]
        data = (VECTORS / (name + ".drv.json")).read_bytes()
        assert data == _canonical(obj)
        h = _spec_hash_modulo(obj, drv_hash_of)
        assert h == want["drvHash"], name
        for out, path in obj["outputs"].items():
            store_name = obj["name"] if out == "out" else f"{obj['name']}-{out}"
            assert path == f"{store_dir}/{_path_hash('output', store_dir, store_name, h, out)}-{store_name}"
        assert want["outputs"] == obj["outputs"]
        # .drv path: a text path over the file's blake3 and the sorted base names of every input path
        refs = sorted({spec.get("drv") or spec.get("src") or spec.get("store") for spec in obj["inputs"].values()})
        assert refs == want["references"]
        digest = blake3.blake3(data).hexdigest()
        assert digest == want["drvBlake3"]
        base_refs = ",".join(sorted(r.rsplit("/", 1)[1] for r in refs))
        drv_name = obj["name"] + ".drv"
        assert want["drvPath"] == f"{store_dir}/{_path_hash('text', store_dir, drv_name, digest, base_refs)}-{drv_name}"
    # fixed-output: only the declared hash and the name count
    fetch = objs["fetch.toml"]
    assert fetch["builder"] == "builtin:fetchurl" and fetch["args"] == [] and fetch["inputs"] == {}


def test_examples_fetch_has_the_vector_output_path(cli):
    """examples/fetch/fetch.toml fetches another URL than the vector; same name and hash, same path."""
    example = VECTORS.parent.parent.parent / "examples" / "fetch" / "fetch.toml"
    (rec,) = _instantiate_json(cli, example)
    vec = json.loads((VECTORS / "vectors.json").read_text())
    assert rec["outputs"]["out"]["path"] == vec["derivations"]["fetch.toml"]["outputs"]["out"]


def test_absurdly_nested_toml_is_one_line_not_a_traceback(cli, tmp_path):
    f = tmp_path / "nested.toml"
    f.write_text('name = "n"\nbuilder = "/bin/sh"\nargs = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_one_error_line(cli("instantiate", f), 2, f"{f}:1: ", "nested too deeply")
    config = tmp_path / "config.toml"
    config.write_text("substituters = " + "[" * 100_000 + "]" * 100_000 + "\n")
    ok = tmp_path / "ok.toml"
    ok.write_text('name = "ok"\nbuilder = "/bin/sh"\n')
    assert_one_error_line(cli("realise", "--no-out-link", ok, env={"FIMIO_CONFIG": config}), 2, f"{config}: ", "nested")


def test_a_chain_of_thousands_of_derivations_is_planned_and_collected(cli, tmp_path):
    """Graph walks (instantiation, loading .drv files, planning, gc) use no recursion: the
    interpreter's limit does not bound a chain's length (2000 levels took 10000 frames)."""
    n = 2000
    for i in range(n):
        dep = f'[inputs]\nprev = {{ drv = "d{i - 1}.toml" }}\n' if i else ""
        write(tmp_path, f"d{i}.toml", f'name = "d{i}"\nbuilder = "/bin/sh"\nargs = ["-c", "echo {i} > $out"]\n{dep}')
    top = tmp_path / f"d{n - 1}.toml"
    drv = cli.out("instantiate", top)
    plan = cli("realise", "-n", drv, env={"FIMIO_NO_FAST_PATH": "1"})  # reads the .drv chain back
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert f"{n} derivation(s) would be built" in plan.stderr + plan.stdout, plan.stderr[-2000:]
    assert len(json.loads(cli.out("gc", "--json"))["deleted"]) == n
    assert cli("verify").returncode == 0


def test_store_inputs_not_valid_here_are_substituted_or_all_named(cli, tmp_path):
    """`store` inputs this store lacks: not found (exit 5) naming every one, nothing written;
    with a substituter that has them, they are taken from it and the build runs."""
    from cachefixtures import make_keys, write_config

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a\n")
    b.write_text("b\n")
    other = tmp_path / "other"
    pa, pb = (f"{STORE_DIR}/{os.path.basename(cli_out)}" for cli_out in (
        run_other(other, "add", a), run_other(other, "add", b)))
    f = write(tmp_path, "uses.toml", 'name = "uses"\nbuilder = "/bin/sh"\nargs = ["-c", "cat $a $b > $out"]\n'
              f'[env]\nPATH = "/usr/bin:/bin"\n[inputs]\na = {{ store = "{pa}" }}\nb = {{ store = "{pb}" }}\n')
    proc = cli("realise", "--no-out-link", f)
    assert proc.returncode == 5 and proc.stderr.splitlines()[-1].startswith("fimio: error: 2 item(s) needed cannot be obtained here")
    assert f"  {pa}: input 'a' of {f}" in proc.stderr and f"  {pb}: input 'b' of {f}" in proc.stderr
    assert not [p for p in os.listdir(cli.physical_store) if p.endswith(".drv")]

    sk, pk = make_keys("other-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    cache = f"file://{tmp_path / 'cache'}"
    run_other(other, "push", cache, pa, pb, "--key", tmp_path / "sk")
    env = {"FIMIO_CONFIG": write_config(tmp_path / "config.toml", trusted=[pk])}
    out = cli.out("realise", "--no-out-link", "--substituter", cache, f, env=env)
    assert open(out).read() == "a\nb\n"


def run_other(root, *args) -> str:
    from conftest import run_fimio

    return run_fimio(list(args), root, check=0).stdout.strip()


def test_names_that_are_not_utf8_in_sources_and_derivation_directories(tmp_path):
    """File names are bytes: a source holding one that is not UTF-8, and a derivation file in
    such a directory, instantiate and realise (twice: the evaluation cache keys them too)."""
    from conftest import Fimio

    cli = Fimio(tmp_path / "root")
    d = os.path.join(os.fsencode(tmp_path), b"lat\xe9")
    os.makedirs(os.path.join(d, b"src"))
    with open(os.path.join(d, b"src", b"caf\xe9"), "wb") as f:
        f.write(b"y")
    with open(os.path.join(d, b"d.toml"), "wb") as f:
        f.write(b'name = "d"\n' + SH.encode() + b'args = ["-c", "echo > $out"]\n[inputs]\nsrc = { path = "src" }\n')
    drv_file = os.fsdecode(os.path.join(d, b"d.toml"))
    first = cli.out("instantiate", drv_file)
    assert cli.out("instantiate", drv_file) == first
    out = cli.out("realise", "--no-out-link", drv_file)
    assert cli.out("realise", "--no-out-link", drv_file) == out


def _forged_drv_variants(good: dict) -> dict:
    """.drv objects a bundle or cache could carry: each differs from ``good`` in one way
    the canonical form or the TOML front end forbids."""
    def changed(**kw):
        obj = json.loads(json.dumps(good))
        for path, value in kw.items():
            *parents, last = path.split("__")
            target = obj
            for p in parents:
                target = target[p]
            target[last] = value
        return obj

    return {
        "an extra key": {**good, "extra": 1},
        "a timeout as text": changed(sandbox__timeout="0"),
        "a negative timeout": changed(sandbox__timeout=-5),
        "a relative host path": changed(sandbox__hostPaths=["usr"]),
        "a reserved variable": changed(env__HOME="/root"),
        "a fetch with a shell": changed(fetch={"url": "file:///x", "hash": "sha256:" + "0" * 64}),
        "another version": changed(fimio=2),
        "an argument that is a number": changed(args=[1]),
        "an environment value that is a number": changed(env__A=1),
        "an environment name with '='": changed(env={"X=Y": "1"}),
        "a host path that is a number": changed(sandbox__hostPaths=[1]),
        "an output name with '-'": changed(outputs={"b-c": good["outputs"]["out"]}),
        "an input outside the store": changed(inputs={"x": {"src": "/etc/passwd"}}),
        "a fetch without url": {**good, "builder": "builtin:fetchurl", "args": [],
                                "fetch": {"hash": "sha256:" + "0" * 64}},
        "a fetch with an md5 hash": {**good, "builder": "builtin:fetchurl", "args": [],
                                     "fetch": {"hash": "md5:abc", "url": "file:///x"}},
    }


def test_a_drv_that_is_not_canonical_or_breaks_the_rules_is_refused(cli, tmp_path):
    """A .drv read back from the store (from a bundle, a cache) must be the canonical form of
    what it says and obey the rules of a derivation file; else two implementations would
    disagree about its outputs, or fimio would build what no derivation file can say."""
    from fimio.store.derivation import canonical_json
    from fimio.store.local import LocalStore

    good_path = cli.out("instantiate", write(tmp_path, "g.toml", 'name = "g"\nbuilder = "/bin/sh"\n'
                                                               'args = ["-c", "echo g > $out"]\n'))
    good = json.loads(pathlib.Path(good_path).read_bytes())
    variants = {**{why: canonical_json(obj) for why, obj in _forged_drv_variants(good).items()},
                "indented JSON": json.dumps(good, indent=1, sort_keys=True).encode(),
                "another name": canonical_json({**good, "name": "other"})}
    store = LocalStore.open(str(cli.root), STORE_DIR)
    try:
        added = {why: store.add_texts([("g.drv", data, [])])[0].path for why, data in variants.items()}
    finally:
        store.close()
    for why, path in added.items():
        proc = cli("realise", "--no-out-link", f"{STORE_DIR}/{path}")
        assert_one_error_line(proc, 2, "not a valid fimio derivation" if why != "another version" else "format version")
    assert cli("realise", "--no-out-link", good_path).returncode == 0
