"""Clear Numba's on-disk cache of the kernels when any kernel source has changed.

Every cpu kernel is ``@njit(cache=True)``: its machine code is written next to its source
(``__pycache__/*.nbi`` and ``*.nbc``, or under ``NUMBA_CACHE_DIR``) and a later process
loads it instead of compiling again. Numba invalidates that code when the function's own
file changes, and only then: code compiled *into* it from another file is not checked.
Kernels here call across files -- ``conv2d_batch_norm/cpu.py`` runs ``batch_norm/cpu.py``'s
kernels inside its own compiled calls, ``sgd/cpu.py`` compiles ``sgd/update.py`` -- so after
an edit to ``batch_norm/cpu.py`` (or a ``git pull`` that brings one) the fused kernel's cached
code would still be the old batch norm's, loaded without a word: a silently wrong answer.

So ``import kernels`` (``kernels/__init__.py``) calls :func:`clear_if_changed`, which hashes
every ``.py`` file under ``kernels/`` (a few milliseconds) and compares the digest with the
one stamped beside the cache; where they differ it deletes the cached kernels of every folder
and writes the new stamp. Only a change of the sources costs compilation; an unchanged tree
loads as before.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the kernels package


def sources_digest(root: Path = ROOT) -> str:
    """sha256 over every ``.py`` file under ``root``: its path relative to root, then its bytes."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def stamp_path(root: Path = ROOT) -> Path:
    """Where the digest of the sources whose compiled code is cached is kept: beside that cache
    (``NUMBA_CACHE_DIR`` where it is set, as Numba does, else the package's ``__pycache__``)."""
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir:
        tag = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        return Path(user_dir) / f"minseg-kernels-{tag}.sources"
    return root / "__pycache__" / "numba-sources.sha256"


def numba_cache_dir(py_file: Path) -> Path:
    """The folder where Numba caches the functions of ``py_file``, by Numba's rules for a source
    file (its ``_CacheLocator`` classes): ``$NUMBA_CACHE_DIR/<folder>_<sha1 of the folder's path>``
    where that variable is set, else ``__pycache__`` beside the file. (Numba falls back to a
    user-wide folder where ``__pycache__`` cannot be written; nothing could be cleared there.)
    Written out rather than asked of Numba: importing Numba here, on ``import kernels``, would
    fix its configuration (``NUMBA_ENABLE_CUDASIM``) before the callers that set it; a test
    checks these paths against Numba's own locators."""
    folder = Path(os.path.abspath(py_file)).parent
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir:
        return Path(user_dir) / f"{folder.name}_{hashlib.sha1(str(folder).encode()).hexdigest()}"
    return folder / "__pycache__"


def cache_location(root: Path = ROOT) -> str:
    """Where the compiled kernels under ``root`` go, for people to read: ``NUMBA_CACHE_DIR`` where it is
    set, else the ``__pycache__`` folders beside the sources (see :func:`numba_cache_dir`)."""
    return os.environ.get("NUMBA_CACHE_DIR") or str(root / "*" / "__pycache__")


def is_cold(root: Path = ROOT) -> bool:
    """Whether no cpu kernel under ``root`` has compiled code in the cache yet (a fresh install, another
    Python, a cleared cache): the process will compile every kernel it calls, which the CLI says first.
    False where the package cannot be written and NUMBA_CACHE_DIR is unset: Numba then caches in a
    user-wide folder that is not looked at here, so nothing is known."""
    if not os.environ.get("NUMBA_CACHE_DIR") and not os.access(root, os.W_OK):
        return False
    return not any(next(numba_cache_dir(p).glob(f"{p.stem}.*.nbi"), None) for p in root.rglob("cpu.py"))


def clear(root: Path = ROOT) -> None:
    """Delete the cached compiled code of every ``.py`` file under ``root``."""
    # one folder per source folder (Numba's locators give each its own), holding only its files' code
    for folder in {numba_cache_dir(path) for path in root.rglob("*.py")}:
        for cached in folder.glob("*.nb[ic]"):
            cached.unlink(missing_ok=True)  # another process may have removed it first


def clear_if_changed(root: Path = ROOT, stamp: Path | None = None) -> bool:
    """:func:`clear` where the sources' digest differs from the stamp (or there is no stamp),
    then stamp the new digest. Returns whether it cleared. A cache or stamp that cannot be
    written (a read-only install) is left alone."""
    stamp = stamp or stamp_path(root)
    digest = sources_digest(root)
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    try:
        clear(root)
    except OSError:
        return False
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        partial = stamp.with_name(f"{stamp.name}.{os.getpid()}")
        partial.write_text(digest)
        partial.replace(stamp)  # atomic: a process starting meanwhile reads the old stamp or the new
    except OSError:
        pass
    return True
