"""The package as users install it: a wheel built from the checkout (not the editable
install the other tests run) holds every module, declares the ``fimio`` console script,
and works on its own."""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"store": "fimio/store", "cli": "fimio/cli"}  # source dir -> installed dir


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built offline from a copy of the sources (the checkout stays clean)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (work / "dist").glob("fimio-*.whl")
    return found


def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(REPO / source).as_posix()}"
        for source, target in PACKAGES.items()
        for path in (REPO / source).rglob("*.py")
    }
    assert len(expected) > 50
    assert expected - names == set()


def test_the_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(entry_points).decode())
    assert parser["console_scripts"]["fimio"] == "fimio.cli:main"


def test_the_installed_wheel_alone_adds_and_dumps_a_tree(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("hello\n")
    # The wheel's directory goes first on sys.path, so its fimio is imported, not the
    # checkout's editable install; the script proves which one ran.
    script = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import fimio.store; "
              "assert fimio.store.__file__.startswith(sys.path[0]), fimio.store.__file__; "
              "from fimio.cli import main; main()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIMIO_")}
    env.update(FIMIO_ROOT=str(tmp_path / "root"), FIMIO_CONFIG=os.devnull)

    def fimio(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, str(site), *args],
                              capture_output=True, env=env, timeout=60)

    added = fimio("add", str(tree))
    assert added.returncode == 0, added.stderr
    path = added.stdout.decode().strip()
    assert path.endswith("-tree")
    dumped = fimio("dump", path)
    assert dumped.returncode == 0, dumped.stderr
    assert b"hello\n" in dumped.stdout and dumped.stdout.startswith(b"\r\x00\x00\x00\x00\x00\x00\x00nix-archive-1")


def test_a_command_leaves_the_exit_no_objects_to_walk(tmp_path):
    # The interpreter's last collection at exit walks every live object unless frozen:
    # 10-20 ms of a short command. atexit handlers run just before it.
    script = ("import atexit, gc; from fimio.cli import main; "
              "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 1000)); main()")
    env = dict(os.environ, FIMIO_ROOT=str(tmp_path / "root"))
    done = subprocess.run([sys.executable, "-c", script, "verify"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "frozen True"


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    # A Ctrl-C while the command's modules are still being imported (here: click's import
    # raises it) ends as every other interrupt does, not in a traceback.
    script = ("import sys\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'click': raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "from fimio.cli import main; main()")
    env = dict(os.environ, FIMIO_ROOT=str(tmp_path / "root"))
    done = subprocess.run([sys.executable, "-c", script, "verify"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 130 and done.stderr == "fimio: error: interrupted\n", done.stderr
