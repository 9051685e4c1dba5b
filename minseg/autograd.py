"""Reverse-mode automatic differentiation: Function, Context, no_grad, gradcheck.

A :class:`Function` is one differentiable step. Its ``forward(ctx, *arrays)``
computes the output from raw arrays and stores on ``ctx`` whatever the
backward needs; its ``backward(ctx, grad)`` receives dL/d(output) and returns
dL/d(input) for every input (``None`` where an input needs no gradient).
``Function.apply`` wraps the arrays of Tensor arguments, runs ``forward`` and,
when gradients are wanted, records a node that links the output to its inputs.
``Tensor.backward`` then walks these nodes in reverse topological order
(see ``tensor.py``).

This module knows nothing of ``Tensor`` beyond its base class :class:`Node`
(the part of a Tensor the graph needs), so ``tensor.py`` builds on it and not
the other way round: the core imports in one direction, autograd <- tensor <-
functional.
"""
from __future__ import annotations

import contextlib

import numpy as np

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager / decorator: ops inside record no graph (inference, optimizer steps)."""

    def __enter__(self):
        global _grad_enabled
        self.previous = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self.previous


class enable_grad(no_grad):
    """Turns graph recording back on inside a ``no_grad`` block."""

    def __enter__(self):
        global _grad_enabled
        self.previous = _grad_enabled
        _grad_enabled = True


class Node:
    """What the graph is made of: a value ``data`` that may want a gradient.

    ``_ctx`` is the :class:`Context` of the Function that made the node (None for a
    leaf, which the user made). :class:`~minseg.tensor.Tensor` is a Node with an
    array API and operators; Functions make their outputs of the same class as
    their first Node argument.
    """

    def __init__(self, data, requires_grad: bool = False):
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._ctx = None

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None


class Context:
    """What a Function's forward leaves for its backward; also the graph node.

    ``inputs`` are the Tensor arguments in order (None for non-Tensor ones),
    ``needs_input_grad[i]`` says whether input ``i`` wants a gradient (read from
    the inputs unless the caller, ``Function.apply``, already knows it).
    """

    def __init__(self, function, inputs, needs_input_grad=None):
        self.function = function
        self.inputs = inputs
        if needs_input_grad is None:
            needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs)
        self.needs_input_grad = needs_input_grad
        self._saved = ()
        self.freed = False

    def save_for_backward(self, *arrays):
        self._saved = arrays

    @property
    def saved_tensors(self):
        if self.freed:
            raise RuntimeError(
                f"Trying to backward through {self.function.__name__} a second time: its saved "
                "arrays were freed after the first backward. Pass retain_graph=True to the first "
                "backward() if you need to call it twice."
            )
        return self._saved

    def free(self):
        """Drop saved arrays (and any attribute the forward stored) after backward; keep the graph."""
        d = self.__dict__
        function, inputs, needs_input_grad = d["function"], d["inputs"], d["needs_input_grad"]
        d.clear()
        d.update(function=function, inputs=inputs, needs_input_grad=needs_input_grad, _saved=(), freed=True)


class Function:
    """Base class of differentiable ops. Subclasses define two static methods:

    ``forward(ctx, *args, **kwargs) -> array``: Tensor arguments arrive as
    their raw arrays; keyword arguments are never differentiated.

    ``backward(ctx, grad) -> tuple``: one gradient array (or None) per
    positional argument of ``forward``.
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        """Run ``forward`` on the arrays of the arguments; record the node when a gradient is wanted."""
        # One pass over the arguments (this runs for every op of every step): the Node
        # inputs, the arrays forward receives, which inputs want a gradient, and the
        # class of the output (that of the first Node).
        inputs, arrays, needs, node_type = [], [], [], None
        for a in args:
            is_node = isinstance(a, Node)
            inputs.append(a if is_node else None)
            arrays.append(a.data if is_node else a)
            needs.append(is_node and a.requires_grad)
            if is_node and node_type is None:
                node_type = type(a)
        if node_type is None:
            raise TypeError(f"{cls.__name__}.apply needs at least one Tensor argument")
        ctx = Context(cls, tuple(inputs), tuple(needs))
        out = cls.forward(ctx, *arrays, **kwargs)
        requires_grad = _grad_enabled and any(needs)
        result = node_type(out, requires_grad=requires_grad)
        if requires_grad:
            result._ctx = ctx
        return result


class Chain(Function):
    """Functions applied one after another, recorded as one node of the graph.

    ``Chain.apply(*args, steps=((F1, n1, kw1), (F2, n2, kw2), ...))`` computes
    ``y1 = F1(args[:n1], **kw1)``, ``y2 = F2(y1, next n2 args, **kw2)``, ...: every step after
    the first takes the previous output as its first argument, then its own ``n`` arguments.
    Each step's forward and backward are the Function's own, each with its own Context;
    backward runs them in reverse, handing each step's first input gradient to the step before::

        dL/dy_{k-1} = (the first gradient of) F_k.backward(ctx_k, dL/dy_k)

    which is the walk of ``Tensor.backward`` over a path of k nodes, done here directly. The
    result is the same; what it saves is the graph's bookkeeping between the steps (a Tensor, a
    node and a visit per intermediate output, the Python between two kernels), which for a
    layer like conv -> batch norm costs as much as a small kernel. ``nn.Sequential`` chains
    each run of Conv2d, BatchNorm2d[, ReLU] layers (``functional.conv2d_batch_norm_layers``) in
    eval mode; in training the same run is one ``Conv2dBatchNormLayersFunction``, which hands
    all the layers to the kernels at once (one call each way) and walks them the same way.
    """

    @staticmethod
    def forward(ctx, *arrays, steps):
        needs, parts, used, upstream = ctx.needs_input_grad, [], 0, False
        out = None
        for i, (function, count, kwargs) in enumerate(steps):
            own = arrays[used : used + count]
            own_needs = needs[used : used + count]
            used += count
            if i:  # the previous output comes first; it needs a gradient when anything before it does
                own, own_needs = (out, *own), (upstream, *own_needs)
            part = Context(function, (None,) * len(own), tuple(own_needs))
            out = function.forward(part, *own, **kwargs)
            upstream = upstream or any(own_needs)
            parts.append(part)
        ctx.parts = parts
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for i in range(len(ctx.parts) - 1, -1, -1):
            part = ctx.parts[i]
            if grad is None:  # no input of this step or before it wants a gradient
                step_grads = (None,) * len(part.needs_input_grad)
            else:
                step_grads = part.function.backward(part, grad)
                if not isinstance(step_grads, tuple):
                    step_grads = (step_grads,)
            if i:
                grad = step_grads[0] if part.needs_input_grad[0] else None
                step_grads = step_grads[1:]
            grads[:0] = step_grads
        return tuple(grads)


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` when analytic and numerical gradients disagree."""


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0) -> bool:
    """Check the analytic gradients of ``fn`` against central differences, in float64.

    ``fn(*inputs)`` must return one Tensor ``y``. With a random upstream
    gradient ``g`` (seeded), the scalar ``L = sum(y * g)`` has analytic
    gradient ``dL/dx`` from ``backward``; numerically, for every element ``x_k``::

        dL/dx_k ~= (L(x_k + eps) - L(x_k - eps)) / (2 eps)     error O(eps^2)

    Inputs that are Tensors with ``requires_grad`` are checked; they must be
    float64 (float32 round-off, ~1e-7 relative, divided by eps would swamp the
    comparison). An element passes when ``|analytic - numeric| <= atol +
    rtol * |numeric|``. Returns True, or raises :class:`GradcheckError` naming
    the input and its worst element.
    """
    inputs = list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Node) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input is a Tensor with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} must be float64 for finite differences, got {inputs[i].dtype}")

    y = fn(*inputs)
    if not isinstance(y, Node):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(y).__name__}")
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(y.shape)
    for i in checked:
        inputs[i].grad = None
    if not y.requires_grad:
        raise GradcheckError("gradcheck: the output does not require grad (no differentiable path)")
    y.backward(type(y)(y.xp.asarray(g, dtype=y.dtype)))

    def loss():
        with no_grad():
            out = fn(*inputs)
        return float((out.numpy().astype(np.float64) * g).sum())

    for i in checked:
        x = inputs[i]
        analytic = np.zeros(x.shape) if x.grad is None else x.grad.numpy().astype(np.float64)
        numeric = np.zeros(x.shape)
        flat = x.data.reshape(-1) if x.data.flags.c_contiguous else None
        if flat is None:  # perturb through a contiguous copy shared with the Tensor
            x.data = np.ascontiguousarray(x.data)
            flat = x.data.reshape(-1)
        for k in range(flat.size):
            orig = float(flat[k])
            flat[k] = orig + eps
            up = loss()
            flat[k] = orig - eps
            down = loss()
            flat[k] = orig
            numeric.reshape(-1)[k] = (up - down) / (2 * eps)
        err = np.abs(analytic - numeric)
        bound = atol + rtol * np.abs(numeric)
        if not np.all(err <= bound):
            worst = np.unravel_index(np.argmax(err - bound), x.shape)
            raise GradcheckError(
                f"gradcheck: gradient of input {i} (shape {x.shape}) is wrong at element {tuple(int(w) for w in worst)}: "
                f"analytic {analytic[worst]:.8g}, numerical {numeric[worst]:.8g}, "
                f"|diff| {err[worst]:.3g} > atol + rtol*|numerical| = {bound[worst]:.3g}; "
                f"{int((err > bound).sum())} of {x.size} elements fail"
            )
    return True


__all__ = ["Node", "Function", "Context", "Chain", "no_grad", "enable_grad", "is_grad_enabled", "gradcheck", "GradcheckError"]
