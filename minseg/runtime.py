"""Process-wide settings minseg changes, each in one named function you can read and switch off.

Teaching modules (``backend.py``, the kernels) have no side effects on import. The
settings below change the whole process, so they live here, and ``backend.load``
applies them when a backend first loads:

* :func:`keep_freed_memory` -- glibc keeps freed blocks mapped (cpu backend);
  ``MINSEG_MALLOC_TUNE=0`` turns it off.
* :func:`fix_simulator_shared_arrays` -- Numba's CUDA simulator gives all threads of
  a block one shared array (cuda backend under the simulator);
  ``MINSEG_SIMULATOR_FIX=0`` turns it off (not advised: block reductions then fail
  now and then).
* :func:`simulate_warp_shuffles` -- adds ``cuda.shfl_down_sync`` to Numba's CUDA
  simulator, which lacks it (numba-cuda 0.30.4), so the warp reductions of
  ``kernels/cuda_common.py`` run, and are tested, without a GPU. Not a setting:
  without it those kernels cannot run under the simulator.
"""
from __future__ import annotations

import os
import sys


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "1") != "0"


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks instead of returning them to the OS.

    A training step allocates the same multi-MB activations and gradients every
    step. glibc serves blocks above its mmap threshold with fresh ``mmap``s and
    unmaps them on free, so every step touches new pages and page-faults on each
    one (``python -m benchmarks train`` prints the faults per step:
    benchmarks/RESULTS.md records ~2,800 before this setting and 2 after).
    Raising the mmap threshold to its maximum (32 MiB on 64-bit, glibc's
    limit) and the trim threshold keeps freed blocks in the heap for the next
    step: a caching allocator for free, the job PyTorch's own allocator does. ``MINSEG_MALLOC_TUNE=0`` leaves malloc alone.
    Returns True when the settings were applied (glibc only).
    """
    if not _enabled("MINSEG_MALLOC_TUNE"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def fix_simulator_shared_arrays() -> bool:
    """Make Numba's CUDA simulator give all threads of a block the same ``cuda.shared.array``.

    The simulator keys a block's shared allocations on the calling line: it ``get``s
    the key and, on a miss, ``set``s a new array. Its threads are real Python threads,
    so two of them can both miss and each keep a *different* array: a block reduction
    then sums garbage, rarely and only under load (seen as a flaky U-Net gradient).
    ``dict.setdefault`` is atomic under the GIL, so every thread gets the one stored
    array. Only the simulator is touched; a real GPU is unaffected. Returns True when
    the fix is in place. ``MINSEG_SIMULATOR_FIX=0`` leaves the simulator as it is.
    """
    if not _enabled("MINSEG_SIMULATOR_FIX"):
        return False
    from numba import config

    if not config.ENABLE_CUDASIM:
        return False
    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "thread_safe", False):
        return True

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: unchanged
            return original(self, shape, dtype, alignment)
        if not isinstance(dtype, np.dtype):
            dtype = np.dtype(numpy_support.as_dtype(dtype)) if isinstance(dtype, types.Type) else np.dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        return self._allocations.setdefault(key, np.empty(shape, dtype))

    array.thread_safe = True
    kernelapi.FakeCUDAShared.array = array
    return True


def simulate_warp_shuffles() -> bool:
    """Give Numba's CUDA simulator ``cuda.shfl_down_sync(mask, value, delta)``.

    On a GPU the 32 lanes of a warp run in lock-step and a shuffle reads another
    lane's register. The simulator runs each CUDA thread as a Python thread, so a
    shuffle becomes a hand-off: lane ``L`` publishes its value for the ``k``-th
    shuffle of its warp under the key ``(k, L)`` and wakes whoever waits for it;
    lane ``L`` then waits for the value of its source lane ``L + delta`` (its own
    value when that lane is outside the warp, as the hardware does) and takes it.
    Each lane waits for one other lane only -- no warp-wide barrier, which under
    the simulator costs several times more. Every lane of the warp must call it
    (mask 0xffffffff); the lanes are those of the block (a last, partial warp has
    fewer). Returns True when the simulator has it.
    """
    from numba import config

    if not config.ENABLE_CUDASIM:
        return False
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    if hasattr(kernelapi.FakeCUDAModule, "shfl_down_sync"):
        return True
    lock = threading.Lock()

    def shfl_down_sync(self, mask, value, delta):
        thread = threading.current_thread()
        manager = thread._manager
        warp, lane = divmod(thread.thread_id, 32)
        delta = int(delta)
        with lock:  # one exchange per (block, warp), created by whichever lane comes first
            exchanges = manager.__dict__.setdefault("_warp_exchanges", {})
            key = (tuple(thread.blockIdx), warp)
            if key not in exchanges:
                exchanges[key] = (min(32, int(np.prod(manager._block_dim)) - 32 * warp), {}, {})
            lanes, values, ready = exchanges[key]
        k = thread.__dict__.get("_shuffles", 0)  # this lane's shuffle count: the k-th call of every lane pairs up
        thread._shuffles = k + 1
        if lane - delta >= 0:  # someone reads this lane
            values[(k, lane)] = value
            ready.setdefault((k, lane), threading.Event()).set()  # setdefault is atomic under the GIL
        source = lane + delta
        if source >= lanes:
            return value
        if not ready.setdefault((k, source), threading.Event()).wait(timeout=120):
            raise RuntimeError(f"shfl_down_sync: lane {source} of warp {warp} never arrived (every lane must call it)")
        ready.pop((k, source))
        return values.pop((k, source))

    kernelapi.FakeCUDAModule.shfl_down_sync = shfl_down_sync
    return True


def return_free_memory() -> bool:
    """Give the pages of freed heap memory back to the OS (glibc's ``malloc_trim(0)``); not a setting.

    :func:`keep_freed_memory` keeps freed blocks in the heap for the next step's allocations. A
    captured step (``minseg/capture.py``) allocates nothing once it replays, so what capturing it
    freed (the recorded step's arrays that moved, an eager step's) would stay resident for
    nothing: the capture calls this once it is done. Returns True when memory was released
    (glibc only)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def apply_for(backend_name: str) -> None:
    """Apply the settings that backend ``backend_name`` benefits from (called by ``backend.load``)."""
    if backend_name == "cpu":
        keep_freed_memory()
    elif backend_name == "cuda":
        fix_simulator_shared_arrays()
        simulate_warp_shuffles()


__all__ = ["keep_freed_memory", "return_free_memory", "fix_simulator_shared_arrays", "simulate_warp_shuffles", "apply_for"]
