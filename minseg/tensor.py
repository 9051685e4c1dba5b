"""Tensor: an array, its gradient, and the graph node that made it.

``Tensor.data`` is a NumPy array (or a CuPy array on a GPU). A Tensor made
by a :class:`~minseg.autograd.Function` remembers that Function's context in
``_ctx``; ``backward()`` walks those contexts from the output back to the
leaves in reverse topological order, so every node's gradient is complete
(summed over every use of the node) before its own backward runs.

The arithmetic operators below are small Functions of their own; each one's
backward sits right under its forward. Binary operators broadcast like NumPy,
so their backward has to *un-broadcast*: a gradient flowing to an operand
that was broadcast along an axis is the sum over that axis.
"""
from __future__ import annotations

import sys

import numpy as np

from . import backend
from .autograd import Function, Node, is_grad_enabled, no_grad


class Tensor(Node):
    """An array (``data``), its gradient (``grad``) and the node of the graph that made it (``_ctx``)."""

    __array_priority__ = 1000  # make ndarray <op> Tensor defer to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        if type(data) is not np.ndarray:  # the common case, a Function's output, needs no conversion
            data = backend.array_module(data).asarray(data)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        super().__init__(data, requires_grad)
        self._retains_grad = False

    # ----------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def xp(self):
        return backend.array_module(self.data)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self):
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array on the host (shares memory when it already is one)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.numel() != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """Same data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward (leaves always keep it)."""
        self._retains_grad = True

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        self.requires_grad = flag
        return self

    def astype(self, dtype) -> Tensor:
        return Cast.apply(self, dtype=np.dtype(dtype))

    def float(self) -> Tensor:
        return self.astype(np.float32)

    def double(self) -> Tensor:
        return self.astype(np.float64)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({np.array2string(self.numpy(), precision=4, threshold=20)}, dtype={self.dtype}{grad})"

    # --------------------------------------------------------------- backward
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into ``.grad`` of every leaf that requires it.

        ``grad`` defaults to 1 for a one-element tensor. Unless ``retain_graph``,
        the graph's saved arrays are freed afterwards, and a second backward
        through it raises.

        The walk is the whole of reverse-mode autodiff: visit the nodes from the
        output back to the leaves, each after every node that used it (reverse
        topological order), so its gradient dL/d(node) is complete -- the sum over
        all its uses -- before the chain rule passes it on through the Function
        that made the node: dL/d(input) = backward(ctx, dL/d(node)).
        """
        grads = {id(self): self._seed_grad(grad)}  # dL/d(node) of the nodes reached so far
        buffers = GradBuffers(grads[id(self)])
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:  # no path from this node to the output carries a gradient
                continue
            if node.is_leaf or node._retains_grad:
                node.grad = buffers.accumulate(node.grad, g, node.dtype)
            if node.is_leaf:
                continue
            ctx = node._ctx
            input_grads = _call_backward(ctx, g)  # the chain rule, one Function at a time
            for inp, ig in zip(ctx.inputs, input_grads):
                if inp is not None and ig is not None and inp.requires_grad:
                    prev = grads.pop(id(inp), None)
                    grads[id(inp)] = ig if prev is None else _sum(prev, ig)  # a node used twice sums
            if not retain_graph:
                ctx.free()

    def _seed_grad(self, grad):
        """dL/d(self): the given gradient (checked) or 1 for a one-element output."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no graph")
        if grad is None:
            if self.numel() != 1:
                raise RuntimeError(f"backward(): grad must be given for a non-scalar output of shape {self.shape}")
            return self.xp.ones(self.shape, dtype=self.dtype)
        grad = grad.data if isinstance(grad, Tensor) else self.xp.asarray(grad)
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"backward(): grad has shape {tuple(grad.shape)}, expected the output's {self.shape}")
        return grad.astype(self.dtype, copy=False)

    # -------------------------------------------------------------- operators
    def __add__(self, other):
        return Add.apply(self, _lift(other, self))

    def __radd__(self, other):
        return Add.apply(_lift(other, self), self)

    def __sub__(self, other):
        return Sub.apply(self, _lift(other, self))

    def __rsub__(self, other):
        return Sub.apply(_lift(other, self), self)

    def __mul__(self, other):
        return Mul.apply(self, _lift(other, self))

    def __rmul__(self, other):
        return Mul.apply(_lift(other, self), self)

    def __truediv__(self, other):
        return Div.apply(self, _lift(other, self))

    def __rtruediv__(self, other):
        return Div.apply(_lift(other, self), self)

    def __pow__(self, other):
        return Pow.apply(self, _lift(other, self))

    def __rpow__(self, other):
        return Pow.apply(_lift(other, self), self)

    def __matmul__(self, other):
        return MatMul.apply(self, _lift(other, self))

    def __rmatmul__(self, other):
        return MatMul.apply(_lift(other, self), self)

    def __neg__(self):
        return Neg.apply(self)

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        return GetItem.apply(self, index=index)

    # ------------------------------------------------------- reductions, views
    def sum(self, dim=None, keepdim: bool = False):
        return Sum.apply(self, dim=_norm_dims(dim, self.ndim), keepdim=keepdim)

    def mean(self, dim=None, keepdim: bool = False):
        return Mean.apply(self, dim=_norm_dims(dim, self.ndim), keepdim=keepdim)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=tuple(shape))

    view = reshape

    def permute(self, *dims):
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        dims = tuple(d % self.ndim for d in dims)
        if sorted(dims) != list(range(self.ndim)):
            raise ValueError(f"permute: dims must be a permutation of 0..{self.ndim - 1}, got {dims}")
        return Permute.apply(self, dims=dims)

    def transpose(self, dim0: int, dim1: int):
        dim0, dim1 = _norm_dims((dim0,), self.ndim)[0], _norm_dims((dim1,), self.ndim)[0]
        dims = list(range(self.ndim))
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return self.permute(dims)

    def exp(self):
        return Exp.apply(self)

    def log(self):
        return Log.apply(self)

    def argmax(self, dim=None, keepdim: bool = False):
        """Index of the largest value (first one on ties); not differentiable."""
        if dim is not None:
            (dim,) = _norm_dims(dim, self.ndim)
        out = self.data.argmax(axis=dim)
        if keepdim and dim is not None:
            out = self.xp.expand_dims(out, dim)
        return Tensor(out)


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Make a leaf Tensor on the active backend's memory.

    Python floats become float32 (as in torch); a NumPy array keeps its dtype
    unless ``dtype`` is given.
    """
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not hasattr(data, "dtype"):
        arr = np.asarray(data)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
    else:
        arr = data
    arr = backend.to_backend_array(arr)
    if dtype is not None:
        arr = arr.astype(dtype)
    else:
        arr = arr.copy()  # a new leaf never aliases the caller's array
    return Tensor(arr, requires_grad=requires_grad)


def _lift(value, like: Tensor) -> Tensor:
    """Turn a Python number or array into a constant Tensor of ``like``'s dtype for floats."""
    if isinstance(value, Tensor):
        return value
    arr = like.xp.asarray(value)
    if arr.dtype.kind in "fiub" and like.dtype.kind == "f" and arr.ndim == 0:
        arr = arr.astype(like.dtype)  # a scalar never promotes the tensor (torch rule)
    return Tensor(arr)


def _norm_dims(dim, ndim):
    """``dim`` (int, sequence or None) as a sorted tuple of axes in [0, ndim); clear errors."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not isinstance(d, int) or not -ndim <= d < max(ndim, 1):
            raise ValueError(f"dim {d!r} is out of range for a tensor with {ndim} dimensions")
    axes = tuple(sorted(d % max(ndim, 1) for d in dims))
    if len(set(axes)) != len(axes):
        raise ValueError(f"dim {dim} names an axis twice")
    return axes


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors of the graph, every node after all the nodes it was made from."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in seen:
                    if parent._ctx is None:  # a leaf has no parents of its own: it is placed at once (before
                        seen.add(id(parent))  # the node being expanded, as every node that uses it comes later)
                        order.append(parent)
                    else:
                        stack.append((parent, False))
    return order


def _call_backward(ctx, g) -> tuple:
    """``ctx.function.backward(ctx, g)``, with clear errors for a freed graph or a wrong answer."""
    if ctx.freed:
        raise RuntimeError(
            f"Trying to backward through {ctx.function.__name__} a second time: the graph was freed "
            "by the first backward(). Pass retain_graph=True to the first call to keep it."
        )
    input_grads = ctx.function.backward(ctx, g)
    if not isinstance(input_grads, tuple):
        input_grads = (input_grads,)
    if len(input_grads) != len(ctx.inputs):
        raise RuntimeError(f"{ctx.function.__name__}.backward returned {len(input_grads)} gradients for {len(ctx.inputs)} inputs")
    for inp, ig, need in zip(ctx.inputs, input_grads, ctx.needs_input_grad):
        if need and ig is not None and ig.shape != inp.data.shape:  # NumPy and CuPy shapes are tuples
            raise RuntimeError(
                f"{ctx.function.__name__}.backward returned a gradient of shape {tuple(ig.shape)} "
                f"for an input of shape {inp.shape}"
            )
    return input_grads


def _sum(prev, ig):
    """``prev + ig``: added into prev when no one else can see it (``_private``), on every core for
    same-shaped contiguous NumPy arrays (``kernels/accumulate/``); else a fresh array."""
    if prev.dtype != ig.dtype or not _private(prev):
        return prev + ig
    if type(ig) is np.ndarray and ig.shape == prev.shape and ig.flags.c_contiguous and prev.flags.c_contiguous:
        backend.kernels_for(prev).accumulate(prev, ig)
    else:  # a broadcast or strided part: NumPy handles any layout
        prev += ig
    return prev


def _held_by_the_walk() -> int:
    """What ``_private`` counts for an array that only the walk holds: one local variable, then
    ``_sum``'s argument. Measured, not assumed (interpreters count references on the stack and in
    frames differently), by the same calls."""
    prev = np.empty(1)
    return _as_sum_holds(prev)


def _as_sum_holds(prev):
    return _references(prev)


def _references(a) -> int:  # as _private counts
    return sys.getrefcount(a)


def _held_by_one_array() -> int:
    """``sys.getrefcount`` of a view's base held by that one view and one local variable."""
    view = np.empty(2)[1:]
    base = view.base
    return sys.getrefcount(base)


_PRIVATE_REFS, _PRIVATE_BASE_REFS = _held_by_the_walk(), _held_by_one_array()


def _private(a) -> bool:
    """Optimisation, not math: may the walk add into ``a``, a partial gradient it holds, in place?

    The lesson needs only ``prev + ig``. But that writes a fresh array, a pass over new memory, and
    in U-Net every skip tensor's gradient is such a sum (max-pool's and cat's gradients). Adding
    into ``prev`` is safe when no one else can see it: it is a writeable NumPy array that only the
    walk holds (its reference count is the walk's own), and it owns its memory or is the
    one view of a buffer no one else holds (``kernels/memory.py`` hands out such views). A gradient
    a Function also gave another input (``Add``), kept in a ``.grad``, or the caller's ``grad`` has
    more references, and is summed into a fresh array as before. NumPy elides temporaries by the
    same test.
    """
    extra = _extra_references or _no_references
    if type(a) is not np.ndarray or sys.getrefcount(a) - extra(a) > _PRIVATE_REFS or not a.flags.writeable:
        return False
    base = a.base
    return base is None or (type(base) is np.ndarray and base.base is None
                            and sys.getrefcount(base) - extra(base) <= _PRIVATE_BASE_REFS)


def _no_references(a) -> int:
    return 0


# While ``minseg.capture`` records a step, the references its tape holds (it keeps every argument
# of the recorded calls): not the walk's, so ``_private`` does not count them.
_extra_references = None


class GradBuffers:
    """Optimisation, not math: store a leaf's first gradient without copying it, when that is safe.

    The lesson needs only ``leaf.grad = g`` (first time) and ``leaf.grad += g``. But
    copying every gradient into a fresh ``.grad`` costs a pass over memory per
    parameter per step, and most gradients are private arrays no one else sees.
    Some are not: ``Add`` hands the *same* array to both its inputs, a backward may
    return a view of another array, and the caller's ``grad`` argument belongs to the
    caller. Storing such an array as a ``.grad`` would let an in-place update of one
    ``.grad`` (``optimizer.step``, ``+=``) change another. So this records every array
    (and the array a view is cut from) already handed out in this backward, and copies
    only those, and read-only arrays.
    """

    def __init__(self, caller_grad):
        # id -> the array itself: holding them keeps every id unique for the whole walk (a freed
        # array's id can name a new one, which would then be copied for nothing)
        self.handed = {id(caller_grad): caller_grad}

    def accumulate(self, current, g, dtype):
        """The new ``.grad``: ``current + g``, or ``g`` itself (as a Tensor) when it is safe to keep."""
        if g.dtype != dtype:
            g = g.astype(dtype)
        if current is not None:
            current.data += g
            return current
        owner = g if g.base is None else g.base
        if not getattr(g.flags, "writeable", True) or id(g) in self.handed or id(owner) in self.handed:  # CuPy has none
            g = owner = g.copy()
        self.handed[id(g)], self.handed[id(owner)] = g, owner
        return Tensor(g)


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the adjoint of NumPy broadcasting.

    Broadcasting copies a value along new leading axes and along axes of size
    1; the derivative of a copy is the sum of the gradients of its copies.
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape) if axes else grad.reshape(shape)


def _binary_shapes(a, b, op):
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together") from None


class Add(Function):
    """y = a + b;  dy/da = 1, dy/db = 1 (then un-broadcast)."""

    @staticmethod
    def forward(ctx, a, b):
        _binary_shapes(a, b, "add")
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):
        return unbroadcast(g, ctx.shapes[0]), unbroadcast(g, ctx.shapes[1])


class Sub(Function):
    """y = a - b;  dy/da = 1, dy/db = -1."""

    @staticmethod
    def forward(ctx, a, b):
        _binary_shapes(a, b, "sub")
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):
        return unbroadcast(g, ctx.shapes[0]), unbroadcast(-g, ctx.shapes[1])


class Mul(Function):
    """y = a * b;  dy/da = b, dy/db = a."""

    @staticmethod
    def forward(ctx, a, b):
        _binary_shapes(a, b, "mul")
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = unbroadcast(g * b, a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(g * a, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b;  dy/da = 1/b, dy/db = -a/b^2 = -y/b."""

    @staticmethod
    def forward(ctx, a, b):
        _binary_shapes(a, b, "div")
        y = a / b
        ctx.save_for_backward(b, y)
        ctx.a_shape = a.shape
        return y

    @staticmethod
    def backward(ctx, g):
        b, y = ctx.saved_tensors
        ga = unbroadcast(g / b, ctx.a_shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(-g * y / b, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    """y = a ** b;  dy/da = b a^(b-1),  dy/db = y ln a (only needed where b requires grad)."""

    @staticmethod
    def forward(ctx, a, b):
        _binary_shapes(a, b, "pow")
        y = a**b
        ctx.save_for_backward(a, b, y)
        return y

    @staticmethod
    def backward(ctx, g):
        a, b, y = ctx.saved_tensors
        ga = unbroadcast(g * b * a ** (b - 1), a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(g * y * backend.array_module(a).log(a), b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = -x;  dy/dx = -1."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class MatMul(Function):
    """Y = A @ B (batched like NumPy);  dL/dA = G @ B^T,  dL/dB = A^T @ G.

    A 1-D operand is treated as a row (A) or column (B) vector and its
    dimension is removed again, exactly as NumPy does.
    """

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul: operands must have at least one dimension, got a scalar")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast") from None
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g
        if a.ndim == 1:
            g2 = g2[..., None, :] if b.ndim > 1 else g2[..., None]
        if b.ndim == 1:
            g2 = g2[..., None]
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = unbroadcast(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            gb = unbroadcast(a2.swapaxes(-1, -2) @ g2, b2.shape).reshape(b.shape)
        return ga, gb


def _expand_reduced(g, shape, dim, keepdim):
    """Broadcast a reduced gradient back over the reduced axes."""
    xp = backend.array_module(g)
    if dim is None:
        dim = tuple(range(len(shape)))
    if not keepdim:
        g = xp.expand_dims(g, dim) if dim else g
    return xp.broadcast_to(g, shape)


class Sum(Function):
    """y = sum_k x_k over ``dim``;  dy/dx_k = 1: the gradient is copied back to every summand."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape, ctx.dim, ctx.keepdim = x.shape, dim, keepdim
        return backend.array_module(x).asarray(x.sum(axis=dim, keepdims=keepdim))

    @staticmethod
    def backward(ctx, g):
        return (_expand_reduced(g, ctx.shape, ctx.dim, ctx.keepdim),)


class Mean(Function):
    """y = (1/n) sum_k x_k;  dy/dx_k = 1/n."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape, ctx.dim, ctx.keepdim = x.shape, dim, keepdim
        ctx.n = x.size if dim is None else int(np.prod([x.shape[d] for d in dim]))
        return backend.array_module(x).asarray(x.mean(axis=dim, keepdims=keepdim))

    @staticmethod
    def backward(ctx, g):
        return (_expand_reduced(g / ctx.n, ctx.shape, ctx.dim, ctx.keepdim),)


class Reshape(Function):
    """A new view of the same numbers: the gradient is reshaped back."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} ({x.size} elements) into {shape}") from None

    @staticmethod
    def backward(ctx, g):
        return (g.reshape(ctx.shape),)


class Permute(Function):
    """Axes reordered by ``dims``: the gradient is permuted by the inverse permutation."""

    @staticmethod
    def forward(ctx, x, dims):
        ctx.inverse = tuple(np.argsort(dims))
        return x.transpose(dims)

    @staticmethod
    def backward(ctx, g):
        return (g.transpose(ctx.inverse),)


class Exp(Function):
    """y = e^x;  dy/dx = e^x = y."""

    @staticmethod
    def forward(ctx, x):
        y = backend.array_module(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g * y,)


class Log(Function):
    """y = ln x;  dy/dx = 1/x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return backend.array_module(x).log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g / x,)


class Cast(Function):
    """y = x in another dtype; the gradient is cast back."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return (g.astype(ctx.dtype),)


class GetItem(Function):
    """y = x[index];  the gradient is scattered (added) back to the selected positions."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        try:
            return backend.array_module(x).asarray(x[index])
        except IndexError as e:
            raise IndexError(f"index {index!r} is invalid for a tensor of shape {tuple(x.shape)}: {e}") from None

    @staticmethod
    def backward(ctx, g):
        xp = backend.array_module(g)
        gx = xp.zeros(ctx.shape, dtype=g.dtype)
        xp.add.at(gx, ctx.index, g)  # add.at: repeated indices accumulate
        return (gx,)


__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "unbroadcast"]
