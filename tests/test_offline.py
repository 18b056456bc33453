"""Offline rebuilds (``spec/offline.md``), through the real console script.

* ``prefetch`` of the example graph (report.toml, and use.toml whose fixed-output input is
  served by a loopback file server) to a ``file://`` cache; then, on a fresh store inside
  ``unshare -n`` (no network device at all), ``realise --offline --substituter file://…``
  of the ``.drv`` paths and of the derivation files rebuilds every regular derivation
  (none is substituted) bit-identically to the online build;
* ``prefetch`` into the local store, then an offline rebuild there;
* missing items offline: exit 5 within 1 s, every item named, and a TCP listener standing
  in for the substituter and the download URL sees no connection at all;
* online-only requests while offline are refused before connecting.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import Fimio, assert_one_error_line
from offlinefixtures import ConnectionRecorder, FileServer, copy_examples, digests, make_key, targets, write_config

UNSHARE = ["unshare", "-n", "--"]


def _unshare_works() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="unshare -n needs root (or user namespaces)")


class Online:
    """The online side, built once per module: examples served on loopback, a signing key,
    and a reference store where both targets were realised online."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.secret, self.public = make_key(tmp)
        self.examples = tmp / "examples"
        self.server = None
        self.server = FileServer(str(_files_dir()))
        copy_examples(self.examples, self.server.port)
        self.targets = targets(self.examples)
        self.config = write_config(tmp / "online.toml", secret_key_files=[self.secret],
                                   trusted_public_keys=[self.public])
        # the offline machine trusts the key and nothing else; it has no secret key
        self.offline_config = write_config(tmp / "offline.toml", trusted_public_keys=[self.public])
        self.ref = Fimio(tmp / "ref-root")
        out = json.loads(self.ref.out("realise", "--json", "--no-out-link", *self.targets, env=self.env))
        self.drvs = [t["drvPath"] for t in out["targets"]]
        self.regular = set(out["built"]) - {self.fod_drv(out)}
        self.fod_output = self._fod_output()
        self.outputs = [o["path"] for t in out["targets"] for o in t["outputs"].values()]
        # every output of the graph, intermediate ones too
        self.all_outputs = self._all_outputs()
        self.digests = digests(self.ref, self.all_outputs)

    @property
    def env(self) -> dict:
        return {"FIMIO_CONFIG": self.config}

    @property
    def offline_env(self) -> dict:
        return {"FIMIO_CONFIG": self.offline_config}

    def fod_drv(self, out) -> str:
        return next(b for b in out["built"] if b.endswith("greeting.txt.drv"))

    def _fod_output(self) -> str:
        drv = json.loads(self.ref.out("instantiate", "--json", str(self.examples / "fetch" / "fetch.toml")))[0]
        return drv["outputs"]["out"]["path"]

    def _all_outputs(self) -> list[str]:
        files = [self.examples / "graph" / f for f in ("greet.toml", "app.toml", "report.toml")]
        files += [self.examples / "fetch" / f for f in ("fetch.toml", "use.toml")]
        out = json.loads(self.ref.out("instantiate", "--json", *files))
        return [o["path"] for d in out for o in d["outputs"].values()]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _files_dir():
    from offlinefixtures import EXAMPLES

    return EXAMPLES / "fetch" / "files"


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    o = Online(tmp_path_factory.mktemp("online"))
    try:
        yield o
    finally:
        o.close()


def _realise_offline(cli: Fimio, online: Online, *args) -> dict:
    proc = cli("realise", "--offline", "--json", "--no-out-link", *args, env=online.offline_env,
               prefix=UNSHARE, check=0)
    return json.loads(proc.stdout)


def _assert_full_rebuild(cli: Fimio, online: Online, out: dict) -> None:
    assert set(out["built"]) == online.regular, "every regular derivation is rebuilt, none substituted"
    assert set(out["substituted"]) <= {online.fod_output}
    assert digests(cli, online.all_outputs) == online.digests, "bit-identical to the online build"


# ---- prefetch to a cache, rebuild elsewhere ---------------------------------------------------


@pytest.fixture(scope="module")
def prefetched(online, tmp_path_factory):
    """A fresh online store that ran ``prefetch --to file://cache``; returns (cli, cache dir, json)."""
    tmp = tmp_path_factory.mktemp("prefetch")
    cli = Fimio(tmp / "root")
    cache = tmp / "cache"
    out = json.loads(cli.out("prefetch", "--json", "--to", f"file://{cache}", *online.targets, env=online.env))
    return cli, cache, out


def test_prefetch_fetches_sources_and_fixed_outputs_but_builds_nothing(online, prefetched):
    cli, cache, out = prefetched
    assert out["fetched"] == [d for d in out["derivations"] if d.endswith("greeting.txt.drv")]
    assert out["fixedOutputs"] == [online.fod_output]
    paths = [p["path"] for p in out["paths"]]
    assert all(p["physical"].endswith("/" + p["path"].rsplit("/", 1)[1]) for p in out["paths"])
    assert set(online.drvs) <= set(paths)
    assert online.fod_output in paths
    assert out["pathsSent"] == len(paths)
    regular_outputs = [p for p in online.all_outputs if p != online.fod_output]
    for p in regular_outputs:
        assert p not in paths
        cli("path-info", p, check=5)  # not built
    # the cache is an ordinary one: signed infos for every path, the fixed output's realisation
    assert len(list((cache / "info").iterdir())) == len(out["paths"])
    assert len(list((cache / "realisations").iterdir())) == 1
    for f in (cache / "info").iterdir():
        assert json.loads(f.read_text())["signatures"][0].startswith("test-1:")


@needs_unshare
def test_offline_rebuild_of_drv_paths_from_the_cache(online, prefetched, tmp_path):
    _, cache, _ = prefetched
    cli = Fimio(tmp_path / "airgapped")
    out = _realise_offline(cli, online, "--substituter", f"file://{cache}", *online.drvs)
    _assert_full_rebuild(cli, online, out)
    assert out["substituted"] == [online.fod_output]
    assert [t["drvPath"] for t in out["targets"]] == online.drvs


@needs_unshare
def test_offline_rebuild_of_derivation_files_from_the_cache(online, prefetched, tmp_path):
    _, cache, _ = prefetched
    cli = Fimio(tmp_path / "airgapped")
    out = _realise_offline(cli, online, "--substituter", f"file://{cache}", *online.targets)
    _assert_full_rebuild(cli, online, out)
    assert [t["drvPath"] for t in out["targets"]] == online.drvs


@needs_unshare
def test_prefetch_offline_from_the_cache_then_rebuild(online, prefetched, tmp_path):
    """prefetch itself works offline from a file:// cache (the .drv paths come with it)."""
    _, cache, _ = prefetched
    cli = Fimio(tmp_path / "airgapped")
    proc = cli("prefetch", "--offline", "--json", "--substituter", f"file://{cache}", *online.drvs,
               env=online.offline_env, prefix=UNSHARE, check=0)
    assert json.loads(proc.stdout)["substituted"] == [online.fod_output]
    out = _realise_offline(cli, online, *online.drvs)  # no substituter at all now
    _assert_full_rebuild(cli, online, out)
    assert out["substituted"] == []


@needs_unshare
def test_prefetch_into_the_local_store_then_rebuild_offline(online, tmp_path):
    cli = Fimio(tmp_path / "root")
    paths = cli.out("prefetch", *online.targets, env=online.env).splitlines()
    assert str(cli.physical_store / online.fod_output.rsplit("/", 1)[1]) in paths
    out = _realise_offline(cli, online, *online.targets)
    _assert_full_rebuild(cli, online, out)
    assert out["substituted"] == []


def test_offline_with_a_cache_signed_by_an_untrusted_key_says_what_it_can_build(online, prefetched, tmp_path):
    """Offline, a cache whose records no trusted key signed is not used: the warning says a
    fixed output cannot be built instead, and the missing fixed output is named (exit 5)."""
    _, cache, _ = prefetched
    secret, public = make_key(tmp_path)  # a key the cache was not signed with
    config = write_config(tmp_path / "other.toml", trusted_public_keys=[public])
    cli = Fimio(tmp_path / "airgapped")
    proc = cli("realise", "--offline", "--no-out-link", "--substituter", f"file://{cache}", *online.targets,
               env={"FIMIO_CONFIG": config})
    assert proc.returncode == 5, proc.stderr
    assert "building instead (offline, a fixed output cannot be)" in proc.stderr, proc.stderr
    assert online.fod_output in proc.stderr


def test_prefetch_is_idempotent(online, prefetched):
    cli, cache, first = prefetched
    again = json.loads(cli.out("prefetch", "--json", "--to", f"file://{cache}", *online.targets, env=online.env))
    assert again["fetched"] == [] and again["pathsSent"] == 0
    assert again["paths"] == first["paths"]


# ---- missing things offline: fast, complete, no connection -----------------------------------


def _fod(path, name, url, fill):
    path.write_text(f'name = "{name}"\n\n[fetch]\nurl = "{url}"\nhash = "sha256:{fill * 64}"\n')


@pytest.fixture
def listener():
    rec = ConnectionRecorder()
    yield rec
    rec.close()


@pytest.fixture
def two_fetches(tmp_path, listener):
    """A derivation with two fixed-output inputs whose URLs point at the recording listener."""
    d = tmp_path / "drvs"
    d.mkdir()
    base = f"http://127.0.0.1:{listener.port}"
    _fod(d / "a.toml", "a.tar", f"{base}/a.tar", "a")
    _fod(d / "b.toml", "b.tar", f"{base}/b.tar", "b")
    (d / "use.toml").write_text('name = "use"\nbuilder = "/bin/sh"\nargs = ["-c", "cat $a $b > $out"]\n'
                                '[inputs]\na = { drv = "a.toml" }\nb = { drv = "b.toml" }\n')
    return d


def _timed(cli, *args, env, check):
    start = time.monotonic()
    proc = cli(*args, env=env, check=check)
    return proc, time.monotonic() - start


def test_offline_missing_items_exit_5_fast_naming_each_without_connecting(tmp_path, listener, two_fetches):
    cli = Fimio(tmp_path / "root")
    sub = f"http://127.0.0.1:{listener.port}"
    cfg = {"FIMIO_CONFIG": write_config(tmp_path / "c.toml")}
    proc, took = _timed(cli, "realise", "--offline", "--substituter", sub, "--no-out-link",
                        two_fetches / "use.toml", env=cfg, check=5)
    assert took < 1.0, f"took {took:.2f} s"
    err = proc.stderr
    assert f"{listener.port}/a.tar" in err and f"{listener.port}/b.tar" in err, err
    assert "-a.tar:" in err and "-b.tar:" in err
    assert f"offline: not using {sub}" in err
    assert err.strip().splitlines()[-1].startswith("fimio: error: 2 item(s)"), err
    assert listener.close() == 0, "offline mode connected to the network"


def test_offline_from_config_file_never_connects(tmp_path, listener, two_fetches):
    cli = Fimio(tmp_path / "root")
    sub = f"http://127.0.0.1:{listener.port}"
    cfg = {"FIMIO_CONFIG": write_config(tmp_path / "c.toml", offline=True, substituters=[sub])}
    proc, took = _timed(cli, "realise", "--no-out-link", two_fetches / "use.toml", env=cfg, check=5)
    assert took < 1.0
    assert "a.tar" in proc.stderr and "b.tar" in proc.stderr
    # prefetch offline: the same two items, nothing fetched
    proc = cli("prefetch", two_fetches / "use.toml", env=cfg, check=5)
    assert "a.tar" in proc.stderr and "b.tar" in proc.stderr
    # an online-only request is refused up front
    proc = cli("prefetch", "--to", sub, two_fetches / "use.toml", env=cfg)
    assert_one_error_line(proc, 6, "offline", sub)
    # so are push, copy and challenge against a network cache
    built = tmp_path / "hello.txt"
    built.write_text("hello\n")
    path = cli.out("add", built).strip()
    for args in (["push", sub, path], ["copy", "--to", sub, path], ["copy", "--from", sub, path]):
        assert_one_error_line(cli(*args, env=cfg), 6, "offline", sub, "set offline = false")
    assert listener.close() == 0


def test_no_offline_overrides_the_config_file(tmp_path, listener, two_fetches):
    cli = Fimio(tmp_path / "root")
    sub = f"http://127.0.0.1:{listener.port}"
    cfg = {"FIMIO_CONFIG": write_config(tmp_path / "c.toml", offline=True, substituters=[sub])}
    for command in ("realise", "prefetch"):
        args = [command, "--no-offline", two_fetches / "use.toml"] + (["--no-out-link"] if command == "realise" else [])
        proc = cli(*args, env=cfg)
        assert "offline" not in proc.stderr, proc.stderr  # online: the listener was asked
    assert listener.close() > 0


def test_offline_drv_target_missing_everywhere(tmp_path, listener, online):
    cli = Fimio(tmp_path / "root")
    sub = f"http://127.0.0.1:{listener.port}"
    empty = tmp_path / "empty-cache"
    proc, took = _timed(cli, "realise", "--offline", "--substituter", sub, "--substituter", f"file://{empty}",
                        "--no-out-link", *online.drvs, env=online.offline_env, check=5)
    assert took < 1.0
    for drv in online.drvs:
        assert drv in proc.stderr
    assert listener.close() == 0


def test_prefetch_offline_flag_refuses_network_cache(tmp_path, listener, online):
    cli = Fimio(tmp_path / "root")
    url = f"http://127.0.0.1:{listener.port}/cache"
    proc = cli("prefetch", "--offline", "--to", url, *online.targets, env=online.env)
    assert_one_error_line(proc, 6, "fimio is offline (--offline)", url)
    assert listener.close() == 0


def test_prefetch_bad_cache_url_is_usage_error(tmp_path, online):
    cli = Fimio(tmp_path / "root")
    proc = cli("prefetch", "--to", "ftp://x/y", *online.targets, env=online.env)
    assert_one_error_line(proc, 2, "bad cache URL")


@needs_unshare
def test_offline_takes_cache_urls_as_online_does(online, prefetched, tmp_path):
    """A path where a URL belongs is exit 2 (not silently dropped, then exit 5); FILE:// is
    the file scheme, usable offline."""
    _, cache, _ = prefetched
    cli = Fimio(tmp_path / "airgapped")
    for bad in (str(cache), "ftp://x/y"):
        proc = cli("realise", "--offline", "--no-out-link", "--substituter", bad, *online.targets,
                   env=online.offline_env, prefix=UNSHARE)
        assert_one_error_line(proc, 2, "bad cache URL")
    out = _realise_offline(cli, online, "--substituter", f"FILE://{cache}", *online.targets)
    _assert_full_rebuild(cli, online, out)


def test_missing_derivations_are_named_at_once_with_what_each_lacks(online, prefetched, tmp_path):
    """Bare hash parts nobody knows are named together with the .drv paths; a .drv the cache
    holds without a source it refers to is named with that source, not called absent."""
    import shutil

    _, cache, _ = prefetched
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    sources = [f for f in (partial / "info").iterdir()
               if not json.loads(f.read_text())["path"].endswith(".drv")
               and json.loads(f.read_text())["path"] != online.fod_output]
    victim = json.loads(sources[0].read_text())["path"]
    sources[0].unlink()
    cli = Fimio(tmp_path / "airgapped")
    nobody = ["0" * 32, "1" * 32]
    proc, took = _timed(cli, "realise", "--offline", "--no-out-link", "--substituter", f"file://{partial}",
                        *nobody, *online.drvs, env=online.offline_env, check=5)
    assert took < 1.0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fimio: error: ") and "cannot be obtained offline" in lines[-1]
    for h in nobody:
        assert any(line.strip().startswith(f"{h}: no store path") for line in lines), proc.stderr
    assert victim in proc.stderr and "held by a substituter, but not what it refers to" in proc.stderr


@pytest.mark.parametrize("with_cache", [False, True], ids=["no-substituter", "empty-file-cache"])
def test_every_kind_of_missing_item_is_named_in_one_run(tmp_path, listener, two_fetches, with_cache):
    """A ``store`` input nobody has, fixed outputs never fetched and a ``.drv`` target nobody
    has are named together: one run tells everything an offline rebuild lacks, and writes
    none of the graph's ``.drv`` files."""
    gone = "/fimio/store/" + "0" * 32 + "-gone"
    lost = "2" * 32  # a bare hash part
    nobody = "/fimio/store/" + "1" * 32 + "-nobody.drv"
    (two_fetches / "needs.toml").write_text(
        'name = "needs"\nbuilder = "/bin/sh"\nargs = ["-c", "cat $gone $lost $use > $out"]\n'
        f'[inputs]\ngone = {{ store = "{gone}" }}\nlost = {{ store = "{lost}" }}\nuse = {{ drv = "use.toml" }}\n'
        f'again = {{ store = "{"0" * 32}" }}\n')  # gone again, by its hash part
    cli = Fimio(tmp_path / "root")
    caches = ["--substituter", f"file://{tmp_path / 'empty-cache'}"] if with_cache else []
    physical = str(tmp_path / "root" / "store" / nobody.rsplit("/", 1)[1])  # the same .drv, spelled again
    proc, took = _timed(cli, "realise", "--offline", *caches, "--no-out-link", two_fetches / "needs.toml", nobody,
                        physical, "1" * 32, env={"FIMIO_CONFIG": write_config(tmp_path / "c.toml")}, check=5)
    assert took < 1.0, f"took {took:.2f} s"
    details = [line.strip() for line in proc.stderr.strip().splitlines()[:-1]]
    assert any(line.startswith(f"{gone}: input ") for line in details), proc.stderr
    assert any(line.startswith(f"{lost}: input 'lost' of ") for line in details), proc.stderr
    assert sum(nobody in line for line in details) == 1, proc.stderr  # named once, by either spelling
    for fod in ("a.tar", "b.tar"):
        assert any(f"-{fod}: fixed-output derivation" in line for line in details), proc.stderr
    assert len(details) == 5 and proc.stderr.strip().splitlines()[-1].startswith("fimio: error: 5 item(s)"), \
        proc.stderr
    assert not list((tmp_path / "root" / "store").glob("*.drv")), "a .drv referring to a missing input was written"
    # prefetch names the same items; a graph with no fixed output to fetch is no exception
    (two_fetches / "plain.toml").write_text(
        f'name = "plain"\nbuilder = "/bin/sh"\nargs = ["-c", "cat $gone > $out"]\n[inputs]\ngone = {{ store = "{gone}" }}\n')
    for graph, count in (("needs.toml", 5), ("plain.toml", 2)):
        proc = cli("prefetch", "--offline", *caches, two_fetches / graph, nobody,
                   env={"FIMIO_CONFIG": write_config(tmp_path / "c.toml")}, check=5)
        assert gone in proc.stderr and nobody in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"fimio: error: {count} item(s)"), proc.stderr
    assert listener.close() == 0
