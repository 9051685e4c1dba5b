"""The active kernel set: which implementation of every op the Functions call.

Every op lives in ``kernels/<op>/`` three times, one module per backend::

    backend "numpy"  ->  kernels/<op>/reference.py   the definition, in NumPy
    backend "cpu"    ->  kernels/<op>/cpu.py         Numba @njit kernels
    backend "cuda"   ->  kernels/<op>/cuda.py        Numba @cuda.jit kernels

All three modules of an op export the same functions with the same signatures
(``kernels/README.md`` lists them). A :class:`Backend` gathers the exports of
every op module of one kind into one namespace, so ``functional.py`` writes
``backend.current().conv2d_forward(...)`` and never names an implementation.

Arrays: the ``numpy`` and ``cpu`` backends work on NumPy arrays. The ``cuda``
backend works on CuPy arrays when a GPU is present; without one it runs the
same kernels under Numba's CUDA simulator on NumPy arrays (set
``NUMBA_ENABLE_CUDASIM=1`` before numba is first imported).
"""
from __future__ import annotations

import importlib
import os

import numpy as np

from . import runtime


def _discover_ops() -> tuple[str, ...]:
    """Every folder of ``kernels/`` that holds a ``reference.py``: adding an op folder registers it."""
    import kernels

    root = os.path.dirname(kernels.__file__)
    return tuple(sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "reference.py"))))


OPS = _discover_ops()
MODULE_OF = {"numpy": "reference", "cpu": "cpu", "cuda": "cuda"}
BACKENDS = tuple(MODULE_OF)


class Backend:
    """One kernel set: attribute lookup finds the op function of this backend."""

    def __init__(self, name: str):
        self.name = name
        self.functions: dict[str, object] = {}
        for op in OPS:
            module = importlib.import_module(f"kernels.{op}.{MODULE_OF[name]}")
            for fn_name in module.__all__:
                if fn_name in self.functions:
                    raise RuntimeError(f"kernel function {fn_name!r} is exported by two op modules")
                self.functions[fn_name] = getattr(module, fn_name)
        self.xp = _cuda_array_module() if name == "cuda" else np

    def __getattr__(self, fn_name):
        try:
            return self.__dict__["functions"][fn_name]
        except KeyError:
            raise AttributeError(f"backend {self.__dict__.get('name')!r} has no kernel {fn_name!r}") from None

    def __repr__(self):
        return f"Backend({self.name!r})"


def _cuda_array_module():
    """CuPy when a real GPU runs the kernels, NumPy under the simulator."""
    from numba import config

    if config.ENABLE_CUDASIM:
        return np
    import cupy  # a real GPU: the gpu extra must be installed

    return cupy


def cuda_status() -> str:
    """'gpu', 'simulator' or a sentence saying why CUDA is unavailable."""
    try:
        from numba import config, cuda
    except ImportError as e:  # pragma: no cover - numba is a dependency
        return f"numba is not importable: {e}"
    if config.ENABLE_CUDASIM:
        return "simulator"
    try:
        if cuda.is_available():
            import cupy  # noqa: F401

            return "gpu"
    except ImportError:
        return "a GPU is present but CuPy is not installed (pip install 'minseg[gpu]')"
    except Exception as e:  # driver errors
        return f"CUDA is unavailable: {e}"
    return "no GPU found; set NUMBA_ENABLE_CUDASIM=1 before importing numba to use the simulator"


_loaded: dict[str, Backend] = {}
_active: str | None = None
_active_backend: Backend | None = None  # _loaded[_active], kept by set_backend


def load(name: str) -> Backend:
    """The Backend called ``name``, imported on first use."""
    if name not in MODULE_OF:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if name not in _loaded:
        if name == "cuda":
            status = cuda_status()
            if status not in ("gpu", "simulator"):
                raise RuntimeError(f"backend 'cuda' is unavailable: {status}")
        _loaded[name] = Backend(name)
        runtime.apply_for(name)  # process-wide settings live in runtime.py, listed there
    return _loaded[name]


def available_backends() -> list[str]:
    """Backends that load on this machine, fastest last."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
            names.append(name)
        except Exception:
            pass
    return names


def default_backend() -> str:
    """``$MINSEG_BACKEND`` if set, else 'cuda' on a real GPU, else 'cpu' (else 'numpy')."""
    env = os.environ.get("MINSEG_BACKEND")
    if env:
        return env
    if cuda_status() == "gpu":
        return "cuda"
    try:
        load("cpu")
        return "cpu"
    except ImportError:
        return "numpy"


def set_backend(name: str) -> None:
    """Make ``name`` ('numpy', 'cpu' or 'cuda') the kernel set that every op calls."""
    global _active, _active_backend
    _active_backend = load(name)
    _active = name


def get_backend() -> str:
    """Name of the active backend."""
    if _active is None:
        set_backend(default_backend())
    return _active


def current() -> Backend:
    """The active Backend object (what the Functions call; every op of every step asks)."""
    return _active_backend if _active_backend is not None else load(get_backend())


class using:
    """``with backend.using('cpu'):`` runs a block on another backend, then restores the old one."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.previous = get_backend()
        set_backend(self.name)
        return current()

    def __exit__(self, *exc):
        set_backend(self.previous)


def array_module(array):
    """numpy or cupy, whichever owns ``array``."""
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def kernels_for(array) -> Backend:
    """The active kernel set when it computes on ``array``'s memory, else the one that does.

    For the kernels that write an array in place (the optimizer's ``sgd_step``, the
    backward walk's ``accumulate``): a model on the GPU (CuPy arrays) updates with the
    cuda kernels whatever backend is active, a model in host memory with the active numpy
    or cpu backend, or with the cpu kernels while the cuda backend of a real GPU is active
    (under the simulator the cuda backend computes on NumPy arrays, so it updates them itself).
    """
    kernels = current()
    xp = array_module(array)
    if kernels.xp is xp:
        return kernels
    return load("cpu" if xp is np else "cuda")


def to_backend_array(array, name: str | None = None):
    """Move ``array`` to the memory that backend ``name`` (default: active) computes on."""
    name = name or _active or default_backend()
    xp = _cuda_array_module() if name == "cuda" else np
    if xp is np:
        if array_module(array) is not np:
            return array.get()
        return np.asarray(array)
    return xp.asarray(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy array on the host, whatever backend made ``array``."""
    if array_module(array) is not np:
        return array.get()
    return np.asarray(array)
