"""A guided tour of the engine: ``python -m minseg.tour`` (or ``minseg tour``).

Eight steps, in the order a learner needs them. Each step runs real code,
prints what it shows, checks it (a failed check stops the tour with an
AssertionError), and names the file and function to read next:

1. a Tensor and the graph it records                 minseg/tensor.py, minseg/autograd.py
2. one Function's forward and backward (conv2d)      minseg/functional.py  Conv2dFunction
3. the backend dispatch                              minseg/backend.py
4. one conv2d through reference, cpu and cuda (v1, v2, CUDA simulator)   kernels/conv2d/
5. the backward's walk on a small encoder-decoder    minseg/tensor.py  Tensor.backward
6. a 4-class segmentation map, softmax, argmax, pixel-wise cross-entropy
7. gradcheck on a small op of your own (and on a wrong one)   minseg/autograd.py  gradcheck
8. the autograd graph as Graphviz DOT text (and PNG)  minseg/viz.py  graph

The tour computes on the ``numpy`` backend (the reference kernels: the
definitions) except where it compares backends, and restores the backend it
found. The CUDA kernels run under Numba's CUDA simulator: when numba is not yet
imported, :func:`main` sets ``NUMBA_ENABLE_CUDASIM=1`` (unless the variable is
already set) so they run in this process; otherwise, if numba was imported
without the simulator, step 4 runs them in a child process that has it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ("background", "building", "tree", "water")
CLASS_LETTERS = ".BTW"  # how the printed maps show each class


class Tour:
    """Printing and checking: every check that passes prints one ``ok`` line."""

    def __init__(self):
        self.checks = 0

    def step(self, number: int, title: str) -> None:
        print(f"\n[{number}/8] {title}")

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"    {line}")

    def check(self, condition, what: str) -> None:
        """Raise (not ``assert``: ``python -O`` must not skip the checks) or print ``ok: what``."""
        if not condition:
            raise AssertionError(f"tour check failed: {what}")
        self.checks += 1
        print(f"    ok: {what}")

    def read_next(self, *places: str) -> None:
        print("    read next: " + "; ".join(places))


def _close(a, b, tol) -> bool:
    return bool(np.allclose(a, b, rtol=0, atol=tol))


# --------------------------------------------------------------------- 1. Tensor


def step_tensor(tour: Tour) -> None:
    from . import tensor

    tour.step(1, "A Tensor and the graph it records")
    a = tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = tensor(np.array([4.0, 5.0, 6.0]), requires_grad=True)
    c = a * b
    loss = c.sum()
    tour.say("a, b = tensor([1, 2, 3], requires_grad=True), tensor([4, 5, 6], requires_grad=True)")
    tour.say("c = a * b; loss = c.sum()")
    tour.say(f"loss = {loss.item()}, made by {loss._ctx.function.__name__}; c made by {c._ctx.function.__name__}")
    tour.check(a.is_leaf and b.is_leaf and not c.is_leaf, "a and b are leaves (made by you), c is not (made by a Function)")
    tour.check(loss._ctx.inputs[0] is c and c._ctx.inputs == (a, b), "each result's ctx.inputs point back to what it was made from")
    loss.backward()
    tour.say(f"loss.backward(): a.grad = {a.grad.numpy()}, b.grad = {b.grad.numpy()}")
    tour.check(np.array_equal(a.grad.numpy(), b.numpy()) and np.array_equal(b.grad.numpy(), a.numpy()), "d(sum a*b)/da = b and d/db = a")
    x = tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x * x).sum().backward()
    tour.say(f"x used twice, (x * x).sum(): x.grad = {x.grad.numpy()}")
    tour.check(np.array_equal(x.grad.numpy(), 2 * x.numpy()), "a tensor used twice gets the sum of both gradients: 2x")
    tour.read_next(
        "minseg/tensor.py: Tensor, Mul (forward and backward side by side), unbroadcast",
        "minseg/autograd.py: Function.apply, Context",
    )


# ------------------------------------------------------------------- 2. Function


def step_function(tour: Tour) -> None:
    from . import functional as F
    from . import tensor

    tour.step(2, "One Function's forward and backward: F.conv2d -> Conv2dFunction")
    rng = np.random.default_rng(2)
    x = tensor(rng.standard_normal((1, 2, 5, 5)), requires_grad=True)
    w = tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = tensor(rng.standard_normal(3), requires_grad=True)
    y = F.conv2d(x, w, b, padding=1)
    ctx = y._ctx
    tour.say("y = F.conv2d(x (1, 2, 5, 5), w (3, 2, 3, 3), b (3,), padding=1)")
    tour.say(f"y {y.shape} made by {ctx.function.__name__}; ctx.kernels = {ctx.kernels!r}")
    tour.say(f"forward saved for backward: {[a.shape for a in ctx.saved_tensors]} (x and w), ctx.args = {ctx.args}")
    tour.check(ctx.function is F.Conv2dFunction and ctx.saved_tensors[0] is x.data, "F.conv2d checked its arguments, then Conv2dFunction.forward saved x and w")
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    # y is linear in w, in b and in x (bias aside), so the chain rule's sum over outputs
    # can be checked without any kernel: for y = A(w) + b, sum(gy * A(w)) = sum(w.grad * w).
    # float64 sums of a few thousand products agree to ~1e-14 relative; 1e-12 leaves room.
    y_data, b_term = y.numpy(), b.numpy()[None, :, None, None]
    tour.say("y.backward(gy) with a random gy; conv2d is linear in each of x, w, b, so")
    tour.say("sum(gy * (y - b)) == sum(w.grad * w) == sum(x.grad * x) and sum(gy) over (n, i, j) == b.grad")
    inner = float((gy * (y_data - b_term)).sum())
    tour.check(np.isclose(inner, float((w.grad.numpy() * w.numpy()).sum()), rtol=1e-12), f"sum(gy * (y - b)) = sum(w.grad * w) = {inner:.6f}")
    tour.check(np.isclose(inner, float((x.grad.numpy() * x.numpy()).sum()), rtol=1e-12), "sum(gy * (y - b)) = sum(x.grad * x)")
    tour.check(_close(b.grad.numpy(), gy.sum(axis=(0, 2, 3)), 1e-12), "b.grad = gy summed over batch, rows and columns")
    tour.read_next(
        "minseg/functional.py: conv2d (argument checks) and Conv2dFunction.forward/backward",
        "kernels/conv2d/reference.py: the formulas and the gradient derivation",
    )


# -------------------------------------------------------------------- 3. backend


def step_backend(tour: Tour) -> None:
    import kernels.conv2d.cpu
    import kernels.conv2d.reference

    from . import backend, tensor
    from . import functional as F

    tour.step(3, "The backend dispatch: which kernels a Function calls")
    tour.say(f"op folders found in kernels/ (each with a reference.py): {', '.join(backend.OPS)}")
    tour.say("backend name -> module of every op folder: " + ", ".join(f"{k} -> {v}.py" for k, v in backend.MODULE_OF.items()))
    numpy_kernels, cpu_kernels = backend.load("numpy"), backend.load("cpu")
    tour.check(numpy_kernels.conv2d_forward is kernels.conv2d.reference.conv2d_forward, "backend 'numpy'.conv2d_forward is kernels/conv2d/reference.py's")
    tour.check(cpu_kernels.conv2d_forward is kernels.conv2d.cpu.conv2d_forward, "backend 'cpu'.conv2d_forward is kernels/conv2d/cpu.py's")
    x = tensor(np.ones((1, 1, 4, 4), np.float32))
    w = tensor(np.ones((1, 1, 3, 3), np.float32), requires_grad=True)
    with backend.using("cpu"):
        y_cpu = F.conv2d(x, w)
    tour.say(f"with backend.using('cpu'): F.conv2d(...) recorded ctx.kernels = {y_cpu._ctx.kernels!r}")
    tour.check(y_cpu._ctx.kernels is cpu_kernels, "the Function took the active backend, and its backward will use the same one")
    tour.read_next("minseg/backend.py: Backend, current, using", "kernels/README.md: the kernel interface every backend implements")


# -------------------------------------------------------------------- 4. kernels


def _conv_cuda_versions(x, w, b, stride, padding, dilation, groups) -> dict:
    """conv2d_forward of kernels/conv2d/cuda.py, every version, run in this process (simulator on)."""
    import kernels.conv2d.cuda as conv_cuda

    from . import runtime

    runtime.fix_simulator_shared_arrays()  # what backend.load('cuda') applies; the kernels are called directly here
    previous = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)  # one Python thread per CUDA thread: switch often so syncthreads waits little
    try:
        return {v: np.asarray(conv_cuda.conv2d_forward(x, w, b, stride, padding, dilation, groups, version=v)) for v in conv_cuda.FORWARD_VERSIONS}
    finally:
        sys.setswitchinterval(previous)


def _cuda_worker(in_path: str, out_path: str) -> None:
    """Child-process side of :func:`_conv_cuda_in_subprocess`."""
    with np.load(in_path) as z:
        x, w, b, stride, padding, dilation, groups = z["x"], z["w"], z["b"], z["stride"], z["padding"], z["dilation"], z["groups"]
    ys = _conv_cuda_versions(x, w, b, tuple(map(int, stride)), tuple(tuple(map(int, p)) for p in padding), tuple(map(int, dilation)), int(groups))
    np.savez(out_path, **{f"v{v}": y for v, y in ys.items()})


def _conv_cuda_in_subprocess(x, w, b, stride, padding, dilation, groups) -> dict:
    """The same as :func:`_conv_cuda_versions`, in a child process with NUMBA_ENABLE_CUDASIM=1.

    Numba reads the variable once, when it is first imported: a process that already
    imported it without the simulator cannot switch.
    """
    root = str(Path(__file__).resolve().parent.parent)  # the folder holding minseg/ and kernels/
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, x=x, w=w, b=b, stride=stride, padding=padding, dilation=dilation, groups=groups)
        code = f"from minseg.tour import _cuda_worker; _cuda_worker({in_path!r}, {out_path!r})"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the CUDA simulator step failed in its subprocess:\n{done.stderr}")
        with np.load(out_path) as z:
            return {int(k[1:]): z[k] for k in z.files}


def _simulator_in_this_process() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def step_kernels(tour: Tour) -> None:
    import kernels.conv2d.cpu as conv_cpu
    import kernels.conv2d.reference as conv_ref

    tour.step(4, "One conv2d, three implementations: kernels/conv2d/{reference,cpu,cuda}.py")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    args = ((2, 1), ((1, 1), (1, 1)), (1, 1), 1)  # stride, padding ((top, bottom), (left, right)), dilation, groups
    tour.say("kernels take raw arrays, already checked by functional.py: x (2, 3, 7, 6), w (4, 3, 3, 3), b (4,),")
    tour.say("stride (2, 1), padding ((1, 1), (1, 1)), dilation (1, 1), groups 1, float32")
    y_ref = conv_ref.conv2d_forward(x, w, b, *args)
    y_cpu = conv_cpu.conv2d_forward(x, w, b, *args)
    in_process = _simulator_in_this_process()
    run = _conv_cuda_versions if in_process else _conv_cuda_in_subprocess
    y_cuda = run(x, w, b, *args)
    where = "in this process" if in_process else "in a subprocess (numba was imported here without the simulator)"
    tour.say(f"cuda versions {sorted(y_cuda)} ran under the CUDA simulator {where}")
    # Each output is a 27-term float32 dot product of values ~N(0, 1): the orders of the
    # additions differ between kernels, and round-off stays near 27 * 2**-24 * |terms| ~ 1e-5.
    tol = 1e-4
    tour.say(f"reference.py  y {y_ref.shape}, y[0, 0, 0, :3] = {np.array2string(y_ref[0, 0, 0, :3], precision=4)}")
    tour.check(y_cpu.shape == y_ref.shape and _close(y_cpu, y_ref, tol), f"cpu.py agrees with reference.py (max |diff| {np.abs(y_cpu - y_ref).max():.1e})")
    for version, y in sorted(y_cuda.items()):
        tour.check(y.shape == y_ref.shape and _close(y, y_ref, tol), f"cuda.py v{version} agrees with reference.py (max |diff| {np.abs(y - y_ref).max():.1e})")
    tour.read_next(
        "kernels/conv2d/reference.py: conv2d_forward (einsum over strided windows)",
        "kernels/conv2d/cpu.py: conv2d_forward (taps / im2col + BLAS)",
        "kernels/conv2d/cuda.py: FORWARD_VERSIONS (v1 _forward_direct_kernel, v2 _forward_gemm_kernel, ...)",
    )


# ------------------------------------------------------------ 5. backward's walk


def _encoder_decoder(rng):
    """A tiny U-Net-shaped network, written out with F: (loss, parameters by name).

    conv -> relu (e, 8x8) -> max_pool -> conv -> relu (4x4) -> bilinear x2 -> cat with e
    (the skip connection: e is used twice) -> conv (4 class logits) -> cross-entropy.
    """
    from . import functional as F
    from . import tensor

    params = {
        "w_enc": tensor(rng.standard_normal((4, 3, 3, 3)) * 0.5, requires_grad=True),
        "w_mid": tensor(rng.standard_normal((8, 4, 3, 3)) * 0.3, requires_grad=True),
        "w_head": tensor(rng.standard_normal((4, 12, 3, 3)) * 0.2, requires_grad=True),
    }
    image = tensor(rng.standard_normal((1, 3, 8, 8)))
    target = tensor(rng.integers(0, 4, (1, 8, 8)))
    e = F.relu(F.conv2d(image, params["w_enc"], padding=1))
    m = F.relu(F.conv2d(F.max_pool2d(e, 2), params["w_mid"], padding=1))
    u = F.interpolate(m, scale_factor=2, mode="bilinear")
    logits = F.conv2d(F.cat([e, u], dim=1), params["w_head"], padding=1)
    loss = F.cross_entropy(logits, target)
    return loss, params, {"image": image, "e": e}


def step_backward_order(tour: Tour):
    from .tensor import _topological_order

    tour.step(5, "The backward's walk: reverse topological order on a small encoder-decoder")
    loss, params, named = _encoder_decoder(np.random.default_rng(5))
    e = named["e"]
    tour.say("e = relu(conv(image)); m = relu(conv(max_pool(e))); u = interpolate(m, x2)")
    tour.say("loss = cross_entropy(conv(cat([e, u])), target)      # e feeds both max_pool and cat")
    walk = list(reversed(_topological_order(loss)))  # exactly the order Tensor.backward visits
    position = {id(t): k for k, t in enumerate(walk)}
    made = [t for t in walk if not t.is_leaf]
    tour.say("backward visits the Functions in this order:")
    tour.say("  " + " -> ".join(t._ctx.function.__name__ for t in made))
    tour.say("then reaches the leaves " + ", ".join(name for name, p in params.items() if id(p) in position))
    tour.check(
        all(position[id(i)] > position[id(t)] for t in made for i in t._ctx.inputs if i is not None and i.requires_grad),
        "every tensor is visited after every tensor made from it",
    )
    users = [t for t in made if any(i is e for i in t._ctx.inputs)]
    tour.check(
        sorted(t._ctx.function.__name__ for t in users) == ["CatFunction", "MaxPool2dFunction"] and all(position[id(e)] > position[id(t)] for t in users),
        "e (used by max_pool2d and cat) waits for both: its gradient is the sum of the two",
    )
    loss.backward()
    tour.check(all(p.grad is not None and p.grad.shape == p.shape for p in params.values()), "after loss.backward() every weight has a gradient of its own shape")
    tour.read_next("minseg/tensor.py: Tensor.backward, _topological_order; then its optimisations, _private and GradBuffers, and autograd.Chain")
    return loss, params, named


# -------------------------------------------------------- 6. segmentation map


def _scene(size: int = 8) -> np.ndarray:
    """A hand-drawn 4-class map: water along the bottom, a building, a tree, background elsewhere."""
    scene = np.zeros((size, size), np.int64)
    scene[1:4, 1:4] = 1  # a building
    scene[1:3, 5:7] = 2  # a tree
    scene[4, 6] = 2
    scene[6:, :] = 3  # water
    return scene


def _rows(*maps) -> list[str]:
    return ["   ".join(" ".join(CLASS_LETTERS[c] for c in row) for row in rows) for rows in zip(*maps)]


def step_segmentation(tour: Tour) -> None:
    from . import functional as F
    from . import tensor

    tour.step(6, "A segmentation map: 4 classes, softmax, argmax, pixel-wise cross-entropy")
    truth = _scene()
    rng = np.random.default_rng(6)
    onehot = np.eye(4)[truth].transpose(2, 0, 1)[None]  # (1, 4, H, W)
    # logits a network might give: the true class favoured by 2.5, plus noise (so a few pixels are wrong)
    logits = tensor(2.5 * onehot + rng.standard_normal(onehot.shape), requires_grad=True)
    probs = F.softmax(logits, dim=1)
    pred = probs.argmax(1).numpy()[0]
    tour.say(f"classes {', '.join(f'{c}={n}' for c, n in zip(CLASS_LETTERS, CLASSES))}; logits (1, 4, 8, 8), one channel per class")
    tour.say("truth             prediction (argmax of softmax over the class axis)")
    for line in _rows(truth, pred):
        tour.say(line)
    sums = probs.sum(1).numpy()
    tour.check(_close(sums, 1.0, 1e-12), "softmax over dim 1: every pixel's 4 probabilities sum to 1")
    tour.check(np.array_equal(pred, logits.numpy()[0].argmax(0)), "argmax of the probabilities = argmax of the logits (softmax keeps the order)")
    tour.say(f"pixel accuracy {np.mean(pred == truth):.3f} ({int((pred != truth).sum())} of {truth.size} pixels wrong)")
    loss = F.cross_entropy(logits, tensor(truth[None]))
    p = probs.numpy()
    by_hand = -np.mean(np.log(np.take_along_axis(p, truth[None, None], 1)))
    tour.check(np.isclose(loss.item(), by_hand, rtol=1e-12), f"cross-entropy = mean over pixels of -log p[true class] = {loss.item():.4f}")
    loss.backward()
    # d(mean_i -log p_i[y_i]) / d logits = (p - onehot) / number of pixels: the softmax and
    # the log cancel into one subtraction, which is why the loss fuses the two.
    expected = (p - onehot) / truth.size
    tour.check(_close(logits.grad.numpy(), expected, 1e-12), "autograd's gradient of the logits = (p - onehot) / pixels")
    tour.read_next(
        "kernels/softmax_cross_entropy/reference.py: cross_entropy_forward/backward (the derivation)",
        "minseg/functional.py: cross_entropy (ignore_index, weights, label smoothing)",
    )


# ----------------------------------------------------------------- 7. gradcheck


def _softplus_function(forgets_upstream: bool):
    from .autograd import Function

    class Softplus(Function):
        """y = log(1 + e^x);  dy/dx = 1 / (1 + e^-x), the logistic sigmoid."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return np.logaddexp(0.0, x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            local = 1.0 / (1.0 + np.exp(-x))
            return (local if forgets_upstream else g * local,)

    return Softplus


def step_gradcheck(tour: Tour) -> None:
    from . import functional as F
    from . import tensor
    from .autograd import GradcheckError, gradcheck

    tour.step(7, "gradcheck: an op of your own against central differences")
    rng = np.random.default_rng(7)
    x = tensor(rng.standard_normal((3, 4)), requires_grad=True)
    softplus, broken = _softplus_function(False), _softplus_function(True)
    tour.say("class Softplus(Function): forward log(1 + e^x), backward g * sigmoid(x)")
    tour.check(gradcheck(softplus.apply, [x]), "gradcheck(Softplus.apply, [x]) passes (float64, random upstream gradient)")
    try:
        gradcheck(broken.apply, [x])
        caught = None
    except GradcheckError as error:
        caught = str(error)
    tour.say("the same op whose backward returns sigmoid(x) without the upstream g:")
    tour.check(caught is not None, "gradcheck rejects it: " + (caught or "")[:90] + "...")
    xc = tensor(rng.standard_normal((1, 2, 5, 5)), requires_grad=True)
    wc = tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    tour.check(gradcheck(lambda a, k: F.conv2d(a, k, stride=2, padding=1), [xc, wc]), "gradcheck of F.conv2d (stride 2, padding 1) in x and w passes")
    tour.read_next("minseg/autograd.py: gradcheck", "tests/grad/: the same check for every op and backend")


# --------------------------------------------------------------------- 8. graph


def step_graph(tour: Tour, loss, params, named, out: Path) -> None:
    from . import viz

    tour.step(8, "The autograd graph, drawn: minseg.viz.graph")
    dot = viz.graph(loss, names={**named, **params})
    out.mkdir(parents=True, exist_ok=True)
    dot_path = out / "encoder_decoder_graph.dot"
    dot_path.write_text(dot)
    boxes = dot.count("shape=box")
    leaves = [name for name in params if f'label="{name}\\n' in dot]
    tour.say(f"viz.graph(loss) of step 5: {boxes} Function boxes, {dot.count(' -> ')} edges -> {dot_path}")
    for line in dot.splitlines()[2:5]:
        tour.say("  " + line.strip())
    tour.check(boxes == len([t for t in _graph_tensors(loss) if not t.is_leaf]), "one box per Function application of the forward")
    tour.check(leaves == list(params) and dot.count("leaf, requires_grad") == len(params), "the three weights are leaves that require grad (blue)")
    tour.check('label="image\\n(1, 3, 8, 8) float64\\nleaf"' in dot, "the image is a leaf that needs no gradient (grey)")
    png = out / "encoder_decoder_graph.png"
    if viz.render_graph(dot, png, missing_ok=True):
        tour.say(f"rendered with Graphviz: {png}")
    else:
        tour.say(f"Graphviz's 'dot' is not installed; render later with: dot -Tpng {dot_path} -o {png}")
    tour.read_next("minseg/viz.py: graph, render_graph")


def _graph_tensors(root) -> list:
    """Every Tensor reachable from ``root`` through ctx.inputs (requires_grad or not)."""
    seen, stack = {id(root): root}, [root]
    while stack:
        t = stack.pop()
        for i in t._ctx.inputs if t._ctx is not None else ():
            if i is not None and id(i) not in seen:
                seen[id(i)] = i
                stack.append(i)
    return list(seen.values())


# ----------------------------------------------------------------------- main


def run(out=None) -> int:
    """Run the eight steps; write the graph files into ``out`` (default: a new temporary folder)."""
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # so step 4's CUDA kernels run in this process
    from . import backend

    start = time.perf_counter()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="minseg-tour-"))
    tour = Tour()
    print("minseg tour: the engine from Tensor to CUDA kernel, one checked step at a time")
    with backend.using("numpy"):
        step_tensor(tour)
        step_function(tour)
        step_backend(tour)
        step_kernels(tour)
        loss, params, named = step_backward_order(tour)
        step_segmentation(tour)
        step_gradcheck(tour)
        step_graph(tour, loss, params, named, out)
    print(f"\ntour finished: {tour.checks} checks passed in {time.perf_counter() - start:.1f} s")
    print("next: README.md 'Start here' (reading order), kernels/README.md (interface, glossary)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minseg.tour", description="A printed, checked walk through minseg's engine.")
    parser.add_argument("--out", default=None, help="folder for the graph's .dot (and .png) files (default: a new temporary folder)")
    return run(parser.parse_args(argv).out)


if __name__ == "__main__":
    sys.exit(main())
