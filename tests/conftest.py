"""Test set-up shared by every test.

* CUDA kernels run under Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is
  set explicitly (do that on a machine with a GPU). The variable must be set
  before numba is first imported, which is why it sits at the very top here.
* Hypothesis profiles: ``ci`` (default) has no deadline, since the first call of a
  Numba kernel compiles it, and few examples so the suite stays fast; ``dev``
  explores more. Choose with HYPOTHESIS_PROFILE=dev. A failing example prints its
  reproduction blob (``@reproduce_failure``) and the seed.
"""
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    # Each simulated CUDA thread is a Python thread; a short switch interval makes
    # kernels that call syncthreads() ~8x faster.
    sys.setswitchinterval(5e-5)

from hypothesis import HealthCheck, settings  # noqa: E402

from minseg import runtime  # noqa: E402

# Tests call kernels/<op>/cuda.py directly, not only through backend.load: apply the
# simulator fixes up front (minseg/runtime.py says what it fixes).
runtime.fix_simulator_shared_arrays()
runtime.simulate_warp_shuffles()

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
