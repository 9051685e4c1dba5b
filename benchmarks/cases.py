"""The benchmark cases: each op at its size, and the U-Net training step, for minseg and torch.

One description of an op case (:class:`OpSpec`) serves every implementation:
a *library* adapter (:class:`MinsegLib` for a minseg backend, :class:`TorchLib`
for torch on a device) turns its NumPy inputs into that library's tensors and
runs the op through the library's public API -- ``minseg.functional`` with the
backend switched by ``minseg.backend.using(name)``, ``torch.nn.functional`` --
so the numbers are what a user of either gets: tensors that require grad, a
graph, ``.backward()``. Forward-only cases run under ``no_grad`` (inference).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .timing import Case, Impl

# --------------------------------------------------------------------- libraries


class MinsegLib:
    """minseg with backend ``name`` ('numpy', 'cpu' or 'cuda'); loading raises if it is unavailable."""

    def __init__(self, name: str):
        import minseg
        from minseg import backend

        backend.load(name)
        self.name, self.label = name, name
        self.minseg, self.backend = minseg, backend
        self.F = minseg.functional

    def active(self):
        return self.backend.using(self.name)

    def no_grad(self):
        return self.minseg.no_grad()

    def tensor(self, array, requires_grad=False):
        with self.active():  # the array moves to the backend's memory (CuPy for 'cuda')
            return self.minseg.tensor(array, requires_grad=requires_grad)

    def to_numpy(self, t) -> np.ndarray:
        return t.numpy() if isinstance(t, self.minseg.Tensor) else self.backend.to_numpy(t)


class CapturedCpuLib(MinsegLib):
    """minseg's 'cpu' backend with the training step recorded once and replayed (``minseg/capture.py``).

    The step's compiled calls are the same as the 'cpu' row's; only the Python between them is gone."""

    def __init__(self):
        super().__init__("cpu")
        self.label = "cpu captured"


class CpuConvVersionLib(MinsegLib):
    """minseg's 'cpu' backend with its conv2d kernels at one numbered version (kernels/conv2d/cpu.py).

    Runs through ``minseg.functional`` like every other library: while active, the loaded
    backend's conv2d functions are called with ``version=k`` (functions whose table lacks k keep
    their default), so forward and backward both use version k. The backend's current entries
    are wrapped, not replaced, so a timing wrapper around them (``train.kernel_time_split``)
    still sees the calls.
    """

    FUNCTIONS = {"conv2d_forward": "FORWARD_VERSIONS", "conv2d_grad_input": "GRAD_INPUT_VERSIONS",
                 "conv2d_grad_weight": "GRAD_WEIGHT_VERSIONS"}

    def __init__(self, version: int):
        import functools

        from kernels.conv2d import cpu

        super().__init__("cpu")
        self.version, self.label = version, f"cpu v{version}"
        self.patched = [name for name, table in self.FUNCTIONS.items() if version in getattr(cpu, table)]
        self.partial = functools.partial

    @contextlib.contextmanager
    def active(self):
        functions = self.backend.load("cpu").functions
        saved = {name: functions[name] for name in self.patched}
        functions.update({name: self.partial(fn, version=self.version) for name, fn in saved.items()})
        try:
            with self.backend.using("cpu"):
                yield
        finally:
            functions.update(saved)


def conv_version_libs(libs: list, versions=None) -> list:
    """One CpuConvVersionLib per numbered CPU conv version in ``versions`` (default: every one
    that runs some function other than the defaults, which the 'cpu' library runs), when 'cpu'
    is among ``libs``; placed right after it. An unknown version is a ValueError listing the known ones."""
    if not any(isinstance(lib, MinsegLib) and lib.label == "cpu" for lib in libs):
        return libs
    from kernels.conv2d import cpu

    tables = {table: getattr(cpu, "DEFAULT_" + table.replace("VERSIONS", "VERSION")) for table in CpuConvVersionLib.FUNCTIONS.values()}
    known = sorted(set().union(*(getattr(cpu, table) for table in tables)))
    if versions is None:  # 'cpu vK' runs version K of each function that has one, the default of the others
        versions = [v for v in known if any(v in getattr(cpu, table) and v != default for table, default in tables.items())]
    elif not set(versions) <= set(known):
        raise ValueError(f"--conv-versions: the CPU conv versions are {known}, got {sorted(versions)}")
    extra = [CpuConvVersionLib(v) for v in versions]
    at = [lib.label for lib in libs].index("cpu") + 1
    return libs[:at] + extra + libs[at:]


def conv_version_line() -> str:
    """What the 'cpu' rows of the conv cases run: the default version of each function."""
    from kernels.conv2d import cpu

    return (f"conv2d 'cpu' = defaults forward v{cpu.DEFAULT_FORWARD_VERSION}, grad_input v{cpu.DEFAULT_GRAD_INPUT_VERSION}, "
            f"grad_weight v{cpu.DEFAULT_GRAD_WEIGHT_VERSION}; 'cpu vK' = every function at version K where it has one "
            "(kernels/conv2d/cpu.py)")


class TorchLib:
    """torch on ``device`` ('cpu' or 'cuda')."""

    def __init__(self, device: str = "cpu", label: str = "torch"):
        import torch

        self.torch, self.device, self.label = torch, device, label
        self.F = torch.nn.functional

    def active(self):
        return contextlib.nullcontext()

    def no_grad(self):
        return self.torch.no_grad()

    def tensor(self, array, requires_grad=False):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device).requires_grad_(requires_grad)

    @staticmethod
    def to_numpy(t) -> np.ndarray:
        return t.detach().cpu().numpy()


# ---------------------------------------------------------------------- op cases


@dataclass
class OpSpec:
    """One op at one size: its inputs (NumPy, float32), the call, and its cost."""

    name: str
    inputs: dict[str, np.ndarray | None]  # keyword arguments of ``op``, in order (None: passed as None)
    op: Callable  # op(F, **tensors) -> output tensor, F = the library's functional module
    backward: bool  # time forward + backward (else forward under no_grad)
    differentiable: tuple[str, ...] = ()  # inputs whose gradients the backward computes
    grad_output: np.ndarray | None = None  # upstream gradient (None: scalar output, d/d itself = 1)
    flops: float | None = None
    nbytes: float | None = None


def op_impl(spec: OpSpec, lib) -> Impl:
    """``spec`` run through ``lib``: one call = the op (and its backward), returning output and gradients."""
    need_grad = set(spec.differentiable) if spec.backward else set()
    tensors = {k: None if v is None else lib.tensor(v, requires_grad=k in need_grad) for k, v in spec.inputs.items()}
    leaves = [tensors[k] for k in spec.inputs if k in need_grad]
    gy = None if spec.grad_output is None else lib.tensor(spec.grad_output)

    def run():
        with lib.active():
            if not spec.backward:
                with lib.no_grad():
                    return [spec.op(lib.F, **tensors)]
            y = spec.op(lib.F, **tensors)
            y.backward(gy)
            return [y] + [t.grad for t in leaves]

    def reset():
        for t in leaves:
            t.grad = None

    return Impl(lib.label, run, lib.to_numpy, reset)


def _conv(F, x, w, b):
    return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def _bilinear(F, x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _cross_entropy(F, logits, target):
    return F.cross_entropy(logits, target)


def _max_pool(F, x):
    return F.max_pool2d(x, 2)


def unet_conv_layers(size: str = "full") -> list[tuple]:
    """(N, C_in, H, W, C_out, k) of every convolution of the benchmark U-Net (``benchmarks/train.py``'s
    TRAIN_SIZES[size], minseg.nn.UNet with bilinear upsampling), in the order of the forward: the
    double convs of inc and down1..depth at halving sizes, of dec depth..1 on [skip, upsampled]
    channels, and the 1x1 head. tests/test_benchmarks_smoke.py checks it against the model's weights."""
    from .train import TRAIN_SIZES

    s = TRAIN_SIZES[size]
    n, image, widths = s["batch"], s["image"], [s["base_channels"] * 2**i for i in range(s["depth"] + 1)]
    layers = [(n, s["in_channels"], image, image, widths[0], 3), (n, widths[0], image, image, widths[0], 3)]
    for i in range(1, s["depth"] + 1):
        size_i = image // 2**i
        layers += [(n, widths[i - 1], size_i, size_i, widths[i], 3), (n, widths[i], size_i, size_i, widths[i], 3)]
    for i in range(s["depth"], 0, -1):
        size_i = image // 2 ** (i - 1)
        layers += [(n, widths[i] + widths[i - 1], size_i, size_i, widths[i - 1], 3), (n, widths[i - 1], size_i, size_i, widths[i - 1], 3)]
    return layers + [(n, widths[0], image, image, s["num_classes"], 1)]


def conv_flops(n, c_in, h, w, c_out, k=3) -> float:
    """2*N*C_out*Ho*Wo*C_in*kh*kw for one forward (stride 1, 'same' padding: Ho, Wo = H, W)."""
    return 2.0 * n * c_out * h * w * c_in * k * k


def conv_layer_bytes(n, c_in, h, w, c_out, k, grad_input, bias, itemsize=4) -> float:
    """Fewest bytes of a conv layer's forward + backward (stride 1, 'same' padding): every tensor
    read or written once -- x, w (and b) read, y written; gy read, gw (and gb) and, if asked, gx
    written. Real kernels move more (x is read again for grad_weight, a written line is first read):
    this is the bound no implementation can beat, the roofline's memory side."""
    x, y, weights = n * c_in * h * w, n * c_out * h * w, c_out * c_in * k * k + (c_out if bias else 0)
    return float(itemsize * (x + 2 * weights + 2 * y + (x if grad_input else 0)))


def bilinear_x2_bytes(n, c, h, w, itemsize=4) -> float:
    """Fewest bytes of forward + backward: read x, write y (4x larger); read gy, write gx."""
    return 10.0 * n * c * h * w * itemsize


def max_pool_2x2_bytes(n, c, h, w, itemsize=4) -> float:
    """Fewest bytes of forward + backward: read x, write y and a 1-byte argmax per output (4 window
    positions); read gy and the argmax, write gx."""
    x, y = n * c * h * w * itemsize, n * c * (h // 2) * (w // 2) * itemsize
    return x + y + 2 * (y / itemsize) + y + x


def cross_entropy_bytes(n, c, h, w, itemsize=4) -> float:
    """Bytes a fused forward + backward ('mean') must move, as the kernels are designed.

    forward: read logits (N*C*S) and targets (int64), write the unscaled gradient (N*C*S);
    backward: read the unscaled gradient, write the logits' gradient (N*C*S).
    """
    logits, target = n * c * h * w * itemsize, n * h * w * 8
    return 4 * logits + target


def _name(shape) -> str:
    return "x".join(str(d) for d in shape)


# Sizes: "full" is issue 4's, "quick" runs in a fraction of a second (smoke test),
# "gpu" is issue 3's realistic size (batch 16, 64-128 channels, 128x128 images).
# conv: (N, C_in, H, W, C_out) with a 3x3 kernel and padding 1.
OP_SIZES = {
    "full": dict(
        conv=[(8, 32, 64, 64, 32), (8, 64, 32, 32, 64)],
        bilinear=(8, 64, 32, 32),
        cross_entropy=(8, 4, 128, 128),
        max_pool=(8, 32, 64, 64),
    ),
    "quick": dict(
        conv=[(2, 4, 10, 10, 4), (2, 8, 5, 5, 8)],
        bilinear=(2, 4, 6, 6),
        cross_entropy=(2, 4, 12, 12),
        max_pool=(2, 4, 10, 10),
    ),
    # Cross-entropy at 19 classes (Cityscapes) and 256x256: 16*19*256*256 float32 logits
    # = 80 MB, more than an H100's or H200's 50 MB L2 cache (NVIDIA's spec), so its GB/s
    # is the memory's, not the cache's.
    "gpu": dict(
        conv=[(16, 64, 128, 128, 64), (16, 128, 128, 128, 128)],
        bilinear=(16, 64, 128, 128),
        cross_entropy=(16, 19, 256, 256),
        max_pool=(16, 64, 128, 128),
    ),
}


def _normal_sampler(rng):
    """normal(*shape, scale=1.0): float32 standard normal draws (times scale) from ``rng``, in call order."""

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return normal


def op_specs(size: str = "full", seed: int = 0) -> list[OpSpec]:
    """The op cases of issue 4 at ``size`` ('full', 'quick' or 'gpu'), with fixed random inputs."""
    rng = np.random.default_rng(seed)
    normal = _normal_sampler(rng)

    sizes = OP_SIZES[size]
    specs = []
    for n, c, h, w, co in sizes["conv"]:
        inputs = dict(x=normal(n, c, h, w), w=normal(co, c, 3, 3, scale=(c * 9) ** -0.5), b=normal(co))
        gy = normal(n, co, h, w)
        flops = conv_flops(n, c, h, w, co)
        label = f"{_name((n, c, h, w))}->{co}"
        specs.append(OpSpec(f"conv2d 3x3 fwd {label}", inputs, _conv, False, flops=flops))
        # fwd+bwd = forward + grad_input + grad_weight: three products of the same size
        specs.append(OpSpec(f"conv2d 3x3 fwd+bwd {label}", inputs, _conv, True, ("x", "w", "b"), gy, flops=3 * flops))
    n, c, h, w = sizes["bilinear"]
    specs.append(
        OpSpec(f"bilinear x2 fwd+bwd {_name((n, c, h, w))}", dict(x=normal(n, c, h, w)), _bilinear, True, ("x",),
               normal(n, c, 2 * h, 2 * w), nbytes=bilinear_x2_bytes(n, c, h, w))
    )
    n, c, h, w = sizes["cross_entropy"]
    inputs = dict(logits=normal(n, c, h, w), target=rng.integers(0, c, (n, h, w)).astype(np.int64))
    specs.append(
        OpSpec(f"cross_entropy fwd+bwd {_name((n, c, h, w))}", inputs, _cross_entropy, True, ("logits",),
               nbytes=cross_entropy_bytes(n, c, h, w))
    )
    n, c, h, w = sizes["max_pool"]
    specs.append(
        OpSpec(f"max_pool2d 2x2 fwd+bwd {_name((n, c, h, w))}", dict(x=normal(n, c, h, w)), _max_pool, True, ("x",),
               normal(n, c, h // 2, w // 2), nbytes=max_pool_2x2_bytes(n, c, h, w))
    )
    return specs


def layer_specs(size: str = "full", seed: int = 0) -> list[OpSpec]:
    """Every conv layer of the benchmark U-Net as the training step runs it: forward + the gradients
    it needs (the first layer's input is the image: no grad_input), with a bias only where the model
    has one (the 1x1 head; the 3x3 convs feed batch norms, whose shift replaces it). ``ops --layers``.
    Each case has its fewest bytes too (``conv_layer_bytes``): the table's '% bound' is then the share
    of the roofline, min(peak, FLOPs / fewest bytes x bandwidth)."""
    rng = np.random.default_rng(seed)
    normal = _normal_sampler(rng)

    specs = []
    for layer, (n, c, h, w, co, k) in enumerate(unet_conv_layers(size), 1):
        bias = k == 1
        inputs = dict(x=normal(n, c, h, w), w=normal(co, c, k, k, scale=(c * k * k) ** -0.5), b=normal(co) if bias else None)
        grads = ("w",) if layer == 1 else ("x", "w")
        grads += ("b",) if bias else ()
        flops = conv_flops(n, c, h, w, co, k) * (3 if "x" in grads else 2)  # forward, grad_weight, grad_input if asked
        specs.append(OpSpec(f"conv2d unet L{layer} {k}x{k} fwd+bwd {_name((n, c, h, w))}->{co}", inputs, _conv, True, grads,
                            normal(n, co, h, w), flops=flops, nbytes=conv_layer_bytes(n, c, h, w, co, k, layer != 1, bias)))
    return specs


def build_case(name: str, libs: list, make_impl: Callable, flops=None, nbytes=None) -> Case:
    """A Case whose implementations are ``make_impl(lib)`` for each library (one that raises is skipped)."""
    impls, skipped = [], {}
    for lib in libs:
        try:
            impls.append(make_impl(lib))
        except Exception as e:  # e.g. a kernel that does not support this case yet
            skipped[lib.label] = f"{type(e).__name__}: {e}"
    return Case(name, impls, flops, nbytes, skipped)


def op_cases(libs: list, size: str = "full", layers: bool = False) -> list[Case]:
    """Every op case for every library; the conv cases also for every numbered CPU conv version.
    ``layers``: instead, every conv layer of the benchmark U-Net (``layer_specs``), default kernels."""
    if layers:
        return [build_case(s.name, libs, lambda lib, s=s: op_impl(s, lib), s.flops, s.nbytes) for s in layer_specs(size)]
    conv_libs = conv_version_libs(libs)
    return [build_case(s.name, conv_libs if s.name.startswith("conv2d") else libs, lambda lib, s=s: op_impl(s, lib),
                       s.flops, s.nbytes) for s in op_specs(size)]
