"""interpolate's backward is the derivative: minseg.gradcheck (float64 central differences)
through minseg.functional.interpolate on the numpy backend."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import interpolate
from tests.kernels.test_interpolate import interp_cases


@settings(max_examples=15)
@given(case=interp_cases(max_planes=2, max_side=5, max_size=8), seed=st.integers(0, 2**16))
def test_interpolate_gradcheck(case, seed):
    # <= 2*2*5*5 = 100 elements would be 200 forwards; keep one of N, C at 1 (<= 50 elements)
    shape = (1,) + case["shape"][1:]
    x = minseg.Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)
    align_corners = case["align_corners"] if case["mode"] == "bilinear" else None
    with backend.using("numpy"):
        assert minseg.gradcheck(
            lambda t: interpolate(
                t, size=case["size"], scale_factor=case["scale_factor"], mode=case["mode"], align_corners=align_corners
            ),
            [x],
            seed=seed,
        )
