"""Module and Parameter: how layers own their weights.

A :class:`Module` finds its parts by attribute assignment, as in torch:
assigning a :class:`Parameter` registers a learnable tensor, assigning a
Module registers a child, and :meth:`Module.register_buffer` registers state
that is saved but not learned (BatchNorm's running statistics). Names are
dotted paths (``down1.conv.0.weight``), which is what :meth:`state_dict`
keys and what :meth:`load_state_dict` checks.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that is a learnable weight of a Module (requires_grad=True)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(backend.to_backend_array(data), requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    training: bool
    # Every attribute assignment and deletion on any Module counts one edit (train()/eval() set
    # ``training`` without counting): a captured step (minseg/capture.py) compares the count to
    # know the model is as recorded.
    edits = 0

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self.__dict__.get("_buffer_names", ()):
            self._buffers[name] = value
        # The registries say what is a parameter, a buffer or a child; every attribute also lives in
        # the instance __dict__, where Python's plain lookup finds it (a forward reads dozens per step,
        # and __getattr__ would run for each).
        object.__setattr__(self, name, value)
        Module.edits += 1

    def __delattr__(self, name):
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        object.__delattr__(self, name)
        Module.edits += 1

    def __getattr__(self, name):  # only for what is not in __dict__: a registry entry written directly
        for registry in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(registry)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name: str, value) -> None:
        """State saved in state_dict but not trained (an array or Tensor)."""
        self.__dict__.setdefault("_buffer_names", set()).add(name)
        setattr(self, name, value if isinstance(value, Tensor) else Tensor(backend.to_backend_array(value)))

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --------------------------------------------------------------- traversal
    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self):
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to_backend(self, name: str | None = None):
        """Move every parameter and buffer to the memory of backend ``name`` (default: the active one)."""
        for _, t in list(self.named_parameters()) + list(self.named_buffers()):
            t.data = backend.to_backend_array(t.data, name)
        return self

    def astype(self, dtype):
        """Cast every floating-point parameter and buffer to ``dtype`` (e.g. float64 for gradcheck)."""
        for _, t in list(self.named_parameters()) + list(self.named_buffers()):
            if t.data.dtype.kind == "f":
                t.data = t.data.astype(dtype)
        return self

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> OrderedDict:
        """Name -> NumPy array copy of every parameter and buffer."""
        state = OrderedDict()
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            state[name] = backend.to_numpy(t.data).copy()
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays from ``state`` into the parameters and buffers (shapes must match).

        With ``strict``, the key sets must be equal; the error lists what is
        missing and what is unexpected.
        """
        own = OrderedDict(list(self.named_parameters()) + list(self.named_buffers()))
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state_dict does not match {type(self).__name__}: missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, t in own.items():
            if name not in state:
                continue
            value = np.asarray(backend.to_numpy(state[name]))
            if value.shape != t.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {value.shape}, but the module's tensor has shape {t.shape}")
            t.data = backend.to_backend_array(value.astype(t.dtype, copy=True))

    # ---------------------------------------------------------------- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return "\n".join(lines) + ("\n)" if len(lines) > 1 else ")")
