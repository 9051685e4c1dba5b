"""kernels/numba_cache.py: the compiled kernels are cleared when any kernel source changes.

Numba checks a cached function against its own file only; the last test shows the stale
answer that gives when a function compiled into it from another file changes, and that
``clear_if_changed`` removes it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels import numba_cache

KERNEL_FILES = [numba_cache.ROOT / "batch_norm" / "cpu.py", numba_cache.ROOT / "sgd" / "update.py", numba_cache.ROOT / "memory.py"]


@pytest.mark.parametrize("user_dir", [False, True], ids=["in-tree", "NUMBA_CACHE_DIR"])
def test_cache_folders_are_numbas_own(user_dir, tmp_path, monkeypatch):
    """``numba_cache_dir`` gives the folder Numba's own locators choose, with and without NUMBA_CACHE_DIR."""
    from numba.core import config
    from numba.core.caching import FunctionCache

    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path) if user_dir else "")
    if user_dir:
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    for path in KERNEL_FILES:
        locators = (cls.from_function(test_cache_folders_are_numbas_own, str(path))
                    for cls in FunctionCache._impl_class._locator_classes)
        numbas = next(loc for loc in locators if loc is not None).get_cache_path()
        assert numba_cache.numba_cache_dir(path) == Path(numbas), path


def _package(root: Path) -> Path:
    """A package of two source folders, each with a cache folder holding Numba's two kinds of file and a .pyc."""
    for folder, text in (("a", "x = 1\n"), ("b", "y = 2\n")):
        (root / folder / "__pycache__").mkdir(parents=True)
        (root / folder / "cpu.py").write_text(text)
        _cache(root / folder)
    return root


def _cache(folder: Path) -> None:
    for name in ("cpu.f-1.py311.nbi", "cpu.f-1.py311.1.nbc", "cpu.cpython-311.pyc"):
        (folder / "__pycache__" / name).write_bytes(b"x")


def _cached(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("__pycache__/*"))


def test_clears_numba_files_when_a_source_changes_and_only_then(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)  # the caches beside the sources, where _package puts them
    root, stamp = _package(tmp_path / "pkg"), tmp_path / "stamp"
    pycs = ["a/__pycache__/cpu.cpython-311.pyc", "b/__pycache__/cpu.cpython-311.pyc"]
    everything = _cached(root)
    assert numba_cache.clear_if_changed(root, stamp)  # no stamp yet: clears
    assert _cached(root) == pycs and stamp.read_text() == numba_cache.sources_digest(root)
    _cache(root / "a"), _cache(root / "b")
    assert not numba_cache.clear_if_changed(root, stamp)  # same sources: the cache stays
    assert _cached(root) == everything
    (root / "b" / "cpu.py").write_text("y = 3\n")  # one file of one folder: every folder is cleared
    assert numba_cache.clear_if_changed(root, stamp)
    assert _cached(root) == pycs
    _cache(root / "a")
    (root / "a" / "new.py").write_text("")  # a new file changes the digest too
    assert numba_cache.clear_if_changed(root, stamp)
    assert _cached(root) == ["a/__pycache__/cpu.cpython-311.pyc", *pycs[1:]]


def test_cold_until_a_cpu_kernel_is_cached(tmp_path, monkeypatch):
    """``is_cold``: no cpu.py of the package has an index file (.nbi) in its cache folder; one cached
    kernel anywhere, in the tree or under NUMBA_CACHE_DIR, makes it warm; .pyc files do not count."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    root = _package(tmp_path / "pkg")
    assert not numba_cache.is_cold(root)
    numba_cache.clear(root)
    assert numba_cache.is_cold(root) and _cached(root) == ["a/__pycache__/cpu.cpython-311.pyc", "b/__pycache__/cpu.cpython-311.pyc"]
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "user"))
    assert numba_cache.is_cold(root)
    folder = numba_cache.numba_cache_dir(root / "b" / "cpu.py")
    folder.mkdir(parents=True)
    (folder / "cpu.g-3.py311.nbi").write_bytes(b"x")
    assert not numba_cache.is_cold(root)
    # a package that cannot be written (an install owned by another user): Numba caches elsewhere, unknown here
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != root)
    assert not numba_cache.is_cold(root)


@pytest.mark.parametrize("cold", [True, False])
def test_cli_says_when_the_kernels_are_compiled_first(cold, monkeypatch, capsys):
    """The CLI's train/eval/predict say a first run will wait for Numba (and nothing on a warm cache or
    another backend): a minute of silence would look like a hang."""
    from minseg import backend, cli

    monkeypatch.setattr(numba_cache, "is_cold", lambda root=numba_cache.ROOT: cold)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/numba")
    with backend.using("cpu"):
        cli._first_compile_notice()
    with backend.using("numpy"):
        cli._first_compile_notice()
    out = capsys.readouterr().out
    assert out == ("first run of the cpu backend here: Numba compiles each kernel once for this machine (about a "
                   "minute for training on 2 cores) and caches it in /somewhere/numba for later runs\n" if cold else "")


def test_digest_covers_paths_and_contents(tmp_path):
    root = _package(tmp_path / "pkg")
    before = numba_cache.sources_digest(root)
    (root / "a" / "cpu.py").rename(root / "a" / "other.py")
    renamed = numba_cache.sources_digest(root)
    (root / "a" / "other.py").write_text("x = 2\n")
    assert len({before, renamed, numba_cache.sources_digest(root)}) == 3


CALLEE = "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return {}\n"
CALLER = "from numba import njit\nfrom pkg.callee import value\n\n@njit(cache=True)\ndef call():\n    return value()\n"
RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from kernels import numba_cache
    if sys.argv[1] == "clear":
        numba_cache.clear_if_changed(Path("pkg").resolve(), Path("stamp").resolve())
    from pkg.caller import call
    print(call())
""")


def test_a_changed_callee_in_another_file_is_stale_without_the_clear_and_fresh_with_it(tmp_path):
    """Numba alone: caller.py's cached code keeps the old callee.py's value. With ``clear_if_changed``
    before the import (what ``import kernels`` does for kernels/): the new one."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "caller.py").write_text(CALLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(numba_cache.ROOT.parent)]), NUMBA_ENABLE_CUDASIM="0")
    env.pop("NUMBA_CACHE_DIR", None)

    def run(mode):
        out = subprocess.run([sys.executable, "-c", RUN, mode], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    (tmp_path / "pkg" / "callee.py").write_text(CALLEE.format(1))
    assert run("clear") == 1
    (tmp_path / "pkg" / "callee.py").write_text(CALLEE.format(22))  # another size too: Numba's own stamp of callee.py changes
    assert run("keep") == 1, "Numba re-checked the caller against its callee: this module may no longer be needed"
    assert run("clear") == 22
