"""Every backend module of an op exports exactly the reference's functions, with the same parameters."""
import importlib
import importlib.util
import inspect
import os
import platform
import resource

import numpy as np
import pytest

import minseg
from minseg import backend, runtime
from tests.helpers import KERNEL_BACKENDS

MODULES = [
    pytest.param(op, name, id=f"{op}-{name}")
    for op in backend.OPS
    for name in KERNEL_BACKENDS
    if importlib.util.find_spec(f"kernels.{op}.{backend.MODULE_OF[name]}") is not None
]


@pytest.mark.parametrize("op", backend.OPS)
def test_reference_exists_and_documents_every_function(op):
    ref = importlib.import_module(f"kernels.{op}.reference")
    assert ref.__doc__ and len(ref.__doc__) > 200, f"kernels/{op}/reference.py needs a module docstring with the math"
    for name in ref.__all__:
        assert getattr(ref, name).__doc__, f"{op}.reference.{name} has no docstring"


@pytest.mark.parametrize("op,name", MODULES)
def test_backend_module_matches_reference_interface(op, name):
    ref = importlib.import_module(f"kernels.{op}.reference")
    mod = importlib.import_module(f"kernels.{op}.{backend.MODULE_OF[name]}")
    assert sorted(mod.__all__) == sorted(ref.__all__)
    for fn in ref.__all__:
        ref_params = list(inspect.signature(getattr(ref, fn)).parameters)
        params = list(inspect.signature(getattr(mod, fn)).parameters)
        assert params[: len(ref_params)] == ref_params, f"{op}.{name}.{fn}{params} differs from reference {ref_params}"


def test_every_public_op_is_exported_and_every_op_folder_documented():
    """A new op needs its functional entry in ``functional.__all__`` and a row in kernels/README.md's table."""
    from minseg import functional

    public = {
        n for n, v in vars(functional).items()
        if inspect.isfunction(v) and v.__module__ == functional.__name__ and not n.startswith("_")
    }
    assert not public - set(functional.__all__), f"add to minseg/functional.py's __all__: {sorted(public - set(functional.__all__))}"
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "README.md")).read()
    undocumented = [op for op in backend.OPS if f"| `{op}/` |" not in readme]
    assert not undocumented, f"add a row to the 'Op folders' table of kernels/README.md for {undocumented}"


def test_backend_switching_and_errors():
    before = minseg.get_backend()
    with backend.using("numpy") as k:
        assert minseg.get_backend() == "numpy" and k.name == "numpy"
        assert callable(k.conv2d_forward)
    assert minseg.get_backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        minseg.set_backend("tpu")
    with pytest.raises(AttributeError, match="no kernel 'nope'"):
        backend.load("numpy").nope  # noqa: B018 (the attribute access is what raises)


def test_available_backends_include_numpy_and_arrays_are_numpy_here():
    assert "numpy" in minseg.available_backends()
    assert backend.to_backend_array(np.ones(2), "numpy").__class__ is np.ndarray


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or os.environ.get("MINSEG_MALLOC_TUNE") == "0",
    reason="malloc tuning is glibc-specific and MINSEG_MALLOC_TUNE=0 turns it off",
)
def test_cpu_backend_reuses_freed_memory_without_page_faults():
    # A "step" allocates two dozen 1-7 MiB arrays (like a U-Net's activations) and frees
    # them. With glibc's defaults each step mmaps fresh blocks and faults on every page
    # (~12,000 faults per step measured here); after keep_freed_memory the blocks come back
    # from the heap already mapped (0 measured). 1,000 leaves room for interpreter noise.
    assert runtime.keep_freed_memory()
    sizes = [(1 << 18) * (1 + k % 7) for k in range(24)]

    def step():
        arrays = [np.ones(n, np.float32) for n in sizes]
        del arrays

    step()  # grow the heap once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults < 1000, f"{faults:.0f} page faults per step of reused allocations"
