"""The training-step case: minseg's UNet and the same network in torch, from the same weights.

One step = zero the gradients, forward, pixel-wise cross-entropy, backward, SGD
update: everything a training loop does per batch except loading the data.

The torch network mirrors ``minseg.nn.UNet`` module for module and *name for
name* (``inc.0.weight``, ``down1.1.running_mean``, ...), so the torch model
loads minseg's ``state_dict`` with ``strict=True``: a missing or extra layer,
or one of another shape, fails there. Both start from the same weights, so
their first losses must agree to float32 rounding (the 'rel err' column).
"""
from __future__ import annotations

import numpy as np

from .cases import CapturedCpuLib, MinsegLib, build_case
from .timing import Impl

# Issue 4's default U-Net: batch 8, 3x64x64 images, 4 classes, channels
# 16-32-64 (base 16, two poolings: depth 2 in minseg.nn.UNet), bilinear
# upsampling with concatenated skips. "quick" is a tiny one for the smoke test.
TRAIN_SIZES = {
    "full": dict(batch=8, in_channels=3, image=64, num_classes=4, base_channels=16, depth=2),
    "quick": dict(batch=2, in_channels=3, image=16, num_classes=4, base_channels=4, depth=2),
}
TRAIN_SIZES["gpu"] = dict(TRAIN_SIZES["full"], batch=16, image=128)  # issue 8: `python -m benchmarks gpu`
TRAIN_SIZES["simulator"] = dict(TRAIN_SIZES["quick"], batch=1, image=4, base_channels=2, depth=1)  # `gpu --simulate`
SGD = dict(lr=0.01, momentum=0.9)


def torch_unet(in_channels, num_classes, base_channels, depth, upsampling="bilinear"):
    """torch twin of ``minseg.nn.UNet`` with the same constructor, module names and forward."""
    import torch
    from torch import nn

    def double_conv(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth = depth
            widths = [base_channels * 2**i for i in range(depth + 1)]
            self.inc = double_conv(in_channels, widths[0])
            self.pool = nn.MaxPool2d(2)
            for i in range(1, depth + 1):
                setattr(self, f"down{i}", double_conv(widths[i - 1], widths[i]))
            for i in range(depth, 0, -1):
                if upsampling == "transpose":
                    up, merged = nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2), 2 * widths[i - 1]
                else:
                    up, merged = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), widths[i] + widths[i - 1]
                setattr(self, f"up{i}", up)
                setattr(self, f"dec{i}", double_conv(merged, widths[i - 1]))
            self.head = nn.Conv2d(widths[0], num_classes, 1)

        def forward(self, x):
            skips = [self.inc(x)]
            for i in range(1, self.depth + 1):
                skips.append(getattr(self, f"down{i}")(self.pool(skips[-1])))
            y = skips.pop()
            for i in range(self.depth, 0, -1):
                y = getattr(self, f"up{i}")(y)
                y = getattr(self, f"dec{i}")(torch.cat([skips.pop(), y], dim=1))
            return self.head(y)

    return UNet()


def conv_flops_per_step(model, x) -> float:
    """FLOPs of every convolution of one training step, counted on the torch twin with forward hooks.

    Forward 2*N*C_out*Ho*Wo*(C_in/groups)*kh*kw per conv; backward twice that (grad_input
    and grad_weight), except the first conv, whose input (the image) needs no gradient.
    """
    import torch

    total, first = [], []

    def hook(module, inputs, output):
        n, c_out, ho, wo = output.shape
        c_in_g, kh, kw = module.weight.shape[1:]
        f = 2.0 * n * c_out * ho * wo * c_in_g * kh * kw
        total.append(f)
        if inputs[0] is x:
            first.append(f)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model.eval()  # leaves BatchNorm's running statistics as they are
    with torch.no_grad():
        model(x)
    model.train()
    for h in handles:
        h.remove()
    return 3 * sum(total) - sum(first)


def _minseg_impl(lib: MinsegLib, config, state, x, t) -> tuple[Impl, int]:
    from minseg.nn import UNet
    from minseg.optim import SGD as MinsegSGD

    with lib.active():
        model = UNet(**config)
        model.load_state_dict(state)  # moves the arrays to the backend's memory
    opt = MinsegSGD(model.parameters(), **SGD)
    X, T = lib.tensor(x), lib.tensor(t)

    def step(X, T):
        opt.zero_grad()
        loss = lib.F.cross_entropy(model(X), T)
        loss.backward()
        opt.step()
        return loss

    if not isinstance(lib, CapturedCpuLib):
        def run():
            with lib.active():
                return [step(X, T)]

        return Impl(lib.label, run, lib.to_numpy), model.num_parameters()

    from minseg.capture import CapturedStep

    captured = CapturedStep(step, model, opt)
    # A capture is validated only on a batch that differs from the recorded one (minseg/capture.py):
    # the calls alternate between the batch and the same batch with its samples rotated.
    batches = [(x, t), (np.roll(x, 1, axis=0), np.roll(t, 1, axis=0))]
    calls = [0]

    def run():
        data = batches[calls[0] % 2]
        calls[0] += 1
        with lib.active():
            loss = captured(*data)
            if calls[0] == 1:  # the first call also records and validates: the later ones replay,
                for data in batches[1], batches[0]:  # and its output is the eager step's (the rel err column)
                    captured(*data)
                calls[0] += 2
        return [loss]

    impl = Impl(lib.label, run, lib.to_numpy)
    impl.captured = captured  # for the step profile (captured_time_split)
    return impl, model.num_parameters()


def _torch_impl(lib, config, state, x, t):
    import torch

    model = torch_unet(**config)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    model.to(lib.device).train()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    X, T = lib.tensor(x), lib.tensor(t)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = lib.F.cross_entropy(model(X), T)
        loss.backward()
        opt.step()
        return [loss]

    return Impl(lib.label, run, lib.to_numpy), sum(p.numel() for p in model.parameters()), model, X


def train_case(libs: list, size: str = "full", seed: int = 0):
    """The training-step Case, plus facts about the model (parameter counts, conv FLOPs) for the report."""
    import minseg
    from minseg.nn import UNet

    s = TRAIN_SIZES[size]
    config = dict(in_channels=s["in_channels"], num_classes=s["num_classes"], base_channels=s["base_channels"], depth=s["depth"])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((s["batch"], s["in_channels"], s["image"], s["image"])).astype(np.float32)
    t = rng.integers(0, s["num_classes"], (s["batch"], s["image"], s["image"])).astype(np.int64)
    minseg.manual_seed(seed)
    with minseg.backend.using("numpy"):
        state = UNet(**config).state_dict()  # one initialisation, loaded into every model

    widths = "-".join(str(s["base_channels"] * 2**i) for i in range(s["depth"] + 1))
    facts = dict(config=config, batch=s["batch"], image=s["image"], channels=widths, sgd=SGD, params={})
    flops = None

    def make(lib):
        nonlocal flops
        if isinstance(lib, MinsegLib):
            impl, count = _minseg_impl(lib, config, state, x, t)
        else:
            impl, count, model, X = _torch_impl(lib, config, state, x, t)
            flops = conv_flops_per_step(model, X)
        facts["params"][lib.label] = count
        return impl

    name = f"unet train step b{s['batch']} {s['in_channels']}x{s['image']}x{s['image']} ch {widths}"
    case = build_case(name, libs, make)
    case.flops = flops
    counts = set(facts["params"].values())
    if len(counts) > 1:
        raise AssertionError(f"minseg and torch U-Nets differ in parameter count: {facts['params']}")
    facts["conv_gflop_per_step"] = None if flops is None else flops / 1e9
    return case, facts


# ------------------------------------------------- where a step's time and memory go


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_memory(impl: Impl, steps: int) -> dict:
    """Peak resident memory of ``steps`` training steps, in MiB, in a process that has only built the model.

    Run in a fresh process per implementation (``--memory-child``): 'base_mib' is the RSS
    once the model, optimizer and batch exist, 'peak_rss_mib' the high-water mark of the
    RSS over the steps (reset to the base first), and 'step_mib' their difference, the
    memory training adds: activations, gradients, optimizer state, workspaces, memory the
    allocator keeps for reuse. The caller ran one step of a small model first, so loading
    kernels (Numba's cache, oneDNN's primitives) is mostly not counted. None where /proc
    cannot reset the mark (not Linux).
    """
    import gc

    gc.collect()
    if not _reset_peak_rss():
        return dict(base_mib=None, peak_rss_mib=None, step_mib=None, steps=steps)
    base = _status_kib("VmRSS")
    for _ in range(steps):
        impl.reset()
        out = impl.run()
        del out
    peak = _status_kib("VmHWM")
    return dict(base_mib=base / 1024, peak_rss_mib=peak / 1024, step_mib=(peak - base) / 1024, steps=steps)


def kernel_time_split(lib: MinsegLib, impl: Impl, steps: int) -> dict:
    """Time of a step inside the backend's kernel functions vs outside them, and per kernel function.

    Every function of the backend (``Backend.functions``, what ``ctx.kernels`` calls) is
    wrapped with a clock for ``steps`` steps; the rest of a step -- the graph walk,
    ``Function.apply``, argument checks, allocation -- is 'outside'. Medians over the steps.
    'kernels' gives each function's median time per step and its calls per step, slowest
    first: where the time inside goes.

    The wrappers' own cost (a Python call and two clock reads per kernel call) lands outside.
    It is measured, not guessed: ``steps`` more steps, interleaved with the others, run with a
    second, identical wrapper around each clock, and the median growth of 'outside' is one
    wrapper layer's cost (``wrapper_s``); ``outside_net_s`` is 'outside' less that.

    A kernel function is itself partly Python: the cpu backend's functions check layouts, pack
    weights, allocate outputs and workspaces, then call compiled (Numba) code. A third set of
    ``steps`` steps, interleaved too, clocks every Numba dispatcher those Python functions call
    (``minseg.capture.kernel_dispatchers``): ``compiled_s`` is the median time per step in compiled code
    (dispatch included), ``host_s`` = 'inside' less that, the Python and NumPy work around it.
    Python that runs right after a kernel runs slowest (the kernel's data has pushed it out of the
    caches), so how the Python time splits between 'outside' and 'host' depends on which runs
    first; their sum does not.
    """
    import time

    from minseg.capture import kernel_dispatchers, set_kernel_globals

    functions = lib.backend.load(lib.name).functions
    saved = dict(functions)
    spent = {name: [0.0, 0] for name in saved}  # this step's [seconds, calls] per kernel function
    unused = [0.0, 0]  # the second layer's clock

    timed = _clocked

    single = {name: timed(fn, spent[name]) for name, fn in saved.items()}
    double = {name: timed(fn, unused) for name, fn in single.items()}
    dispatchers = kernel_dispatchers()
    compiled_clock = [0.0, 0]
    compiled = {where: timed(fn, compiled_clock) for where, fn in dispatchers.items()}
    totals, inside, per_kernel, calls, doubled, in_compiled = [], [], {name: [] for name in saved}, {}, [], []
    try:
        for i in range(3 * steps):
            functions.update(double if i % 3 == 1 else single)
            set_kernel_globals(compiled if i % 3 == 2 else dispatchers)
            impl.reset()
            for clock in (*spent.values(), compiled_clock):
                clock[0], clock[1] = 0.0, 0
            t0 = time.perf_counter()
            out = impl.run()
            total = time.perf_counter() - t0
            kernel = sum(seconds for seconds, _ in spent.values())
            if i % 3 == 1:
                doubled.append(total - kernel)
            elif i % 3 == 2:
                in_compiled.append(compiled_clock[0])
            else:
                totals.append(total)
                inside.append(kernel)
                for name, (seconds, n) in spent.items():
                    per_kernel[name].append(seconds)
                    calls[name] = n
            del out
    finally:
        functions.update(saved)
        set_kernel_globals(dispatchers)
    step, kernel = float(np.median(totals)), float(np.median(inside))
    outside = step - kernel
    wrapper = max(0.0, float(np.median(doubled)) - float(np.median(np.subtract(totals, inside))))
    kernels = {name: dict(s=float(np.median(per_kernel[name])), calls=calls[name]) for name in saved if calls[name]}
    kernels = dict(sorted(kernels.items(), key=lambda item: -item[1]["s"]))
    split = dict(step_s=step, kernel_s=kernel, outside_s=outside, outside_pct=100 * outside / step,
                 wrapper_s=wrapper, outside_net_s=outside - wrapper, outside_net_pct=100 * (outside - wrapper) / step,
                 kernel_calls=sum(calls.values()), steps=steps, kernels=kernels)
    if compiled_clock[1]:  # a backend with compiled code (cpu): how much of 'inside' it is
        compiled_s = min(float(np.median(in_compiled)), kernel)
        split.update(compiled_s=compiled_s, compiled_calls=compiled_clock[1], host_s=kernel - compiled_s,
                     host_pct=100 * (kernel - compiled_s) / step)
    return split


def _clocked(fn, clock: list):
    """``fn`` that adds its seconds to ``clock[0]`` and counts its calls in ``clock[1]``."""
    import time

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - t0
            clock[1] += 1
    return call


def step_profile(case, libs: list, steps: int, memory_of) -> dict:
    """{impl name: memory (``memory_of(label)``, measured in a fresh process) and, for minseg,
    the split of the step's time inside / outside the backend's kernels}."""
    by_label = {lib.label: lib for lib in libs}
    out = {}
    for impl in case.impls:
        out[impl.name] = memory_of(impl.name)
        lib = by_label.get(impl.name)
        if isinstance(lib, CapturedCpuLib):
            out[impl.name].update(captured_time_split(impl, steps))
        elif isinstance(lib, MinsegLib):
            out[impl.name].update(kernel_time_split(lib, impl, steps))
    return out


def captured_time_split(impl: Impl, steps: int) -> dict:
    """The 'cpu captured' row's step: time in its replayed compiled calls, and the rest ('outside':
    the replay's loop, copying the batch in, the checks, ``CapturedStep``'s own Python). Each
    recorded call is clocked by a wrapper for ``steps`` steps; as in ``kernel_time_split``, a
    second set of steps, interleaved, with a second wrapper layer measures the wrappers' own cost."""
    import time

    captured = impl.captured
    impl.run()  # replays from the start, unless this impl has not run yet (its first call captures)
    tape = captured.tape
    if captured.reason is not None or tape is None:
        return dict(capture_error=captured.reason or "no capture")
    recorded = list(tape.calls)
    clock = [0.0, 0]
    single = [(_clocked(fn, clock), *rest) for fn, *rest in recorded]
    double = [(_clocked(fn, clock), *rest) for fn, *rest in single]
    totals, inside, doubled = [], [], []
    try:
        for i in range(2 * steps):
            tape.calls = double if i % 2 else single
            clock[0] = 0.0
            t0 = time.perf_counter()
            out = impl.run()
            total = time.perf_counter() - t0
            if i % 2:
                doubled.append(total - clock[0])
            else:
                totals.append(total)
                inside.append(clock[0])
            del out
    finally:
        tape.calls = recorded
    step, compiled = float(np.median(totals)), float(np.median(inside))
    outside = step - compiled
    wrapper = max(0.0, float(np.median(doubled)) - float(np.median(np.subtract(totals, inside))))
    return dict(step_s=step, compiled_s=compiled, compiled_calls=len(recorded), replays=captured.replays,
                outside_s=outside, outside_pct=100 * outside / step, wrapper_s=wrapper,
                outside_net_s=outside - wrapper, outside_net_pct=100 * (outside - wrapper) / step, steps=steps)


def profile_lines(profile: dict) -> list[str]:
    lines = []
    for name, p in profile.items():
        if "error" in p:
            mem = f"memory not measured: {p['error']}"
        elif p["peak_rss_mib"] is None:
            mem = "peak RSS n/a (no /proc/self/clear_refs)"
        else:
            mem = (f"peak RSS {p['peak_rss_mib']:.1f} MiB over {p['steps']} steps in a fresh process, "
                   f"{p['step_mib']:.1f} MiB above the {p['base_mib']:.1f} MiB it held with the model built")
            if p.get("capture_peak_rss_mib") is not None:
                mem += (f" and the step captured (the capture itself, once, before them: peak {p['capture_peak_rss_mib']:.1f} "
                        f"MiB, {p['capture_mib']:.1f} MiB above the model)")
        line = f"step profile [{name}]: {mem}"
        if "capture_error" in p:
            line += f"; NOT CAPTURED: {p['capture_error']}"
        elif "replays" in p:
            line += (f"; of a {p['step_s'] * 1e3:.2f} ms replayed step (median of {p['steps']}), {p['compiled_s'] * 1e3:.2f} ms "
                     f"in its {p['compiled_calls']} recorded compiled calls and {p['outside_s'] * 1e3:.2f} ms "
                     f"({p['outside_pct']:.1f}%) outside them (copying the batch in, the replay loop, its checks); "
                     f"{p['outside_net_s'] * 1e3:.2f} ms ({p['outside_net_pct']:.1f}%) without the timing wrappers' own "
                     f"{p['wrapper_s'] * 1e3:.2f} ms")
        elif "outside_s" in p:
            line += (f"; of a {p['step_s'] * 1e3:.2f} ms step (median of {p['steps']}), {p['kernel_s'] * 1e3:.2f} ms in "
                     f"{p['kernel_calls']} backend kernel calls and {p['outside_s'] * 1e3:.2f} ms "
                     f"({p['outside_pct']:.1f}%) outside them (graph walk, Function.apply, checks, allocation); "
                     f"{p['outside_net_s'] * 1e3:.2f} ms ({p['outside_net_pct']:.1f}%) without the timing wrappers' own "
                     f"{p['wrapper_s'] * 1e3:.2f} ms (measured: one more wrapper layer)")
            if "compiled_s" in p:
                line += (f"; inside them, {p['compiled_s'] * 1e3:.2f} ms in compiled (Numba) code ({p['compiled_calls']} "
                         f"calls) and {p['host_s'] * 1e3:.2f} ms ({p['host_pct']:.1f}% of the step) in their Python and "
                         "NumPy host code (layout checks, packing, allocation)")
        lines.append(line)
        if p.get("kernels"):
            lines.append(f"step profile [{name}] inside kernels, ms per step (median of {p['steps']}): " + kernel_breakdown(p["kernels"]))
    return lines


TOP_KERNELS = 6  # kernel functions named in the step profile line; the rest are summed


def kernel_breakdown(kernels: dict, top: int = TOP_KERNELS) -> str:
    """'conv2d_grad_weight 12.69 (11 calls), ..., 9 others 2.10': the slowest ``top`` kernel functions, the rest summed."""
    items = list(kernels.items())
    parts = [f"{name} {k['s'] * 1e3:.2f} ({k['calls']} call{'s' if k['calls'] != 1 else ''})" for name, k in items[:top]]
    rest = items[top:]
    if rest:
        parts.append(f"{len(rest)} others {sum(k['s'] for _, k in rest) * 1e3:.2f}")
    return ", ".join(parts)
