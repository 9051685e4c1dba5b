"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, with torch's update rules.

Every optimizer updates ``p.data`` in place from ``p.grad`` (parameters
without a gradient are skipped) and keeps its per-parameter state in
``self.state[i]`` (``i`` = the parameter's position), which
:meth:`Optimizer.state_dict` saves for checkpoints. Notation for one step
``t = 1, 2, ...`` of a parameter ``p`` with gradient ``g``:

SGD (momentum mu, dampening tau, weight decay lambda)::

    g <- g + lambda p
    b <- g                                   (first step)
    b <- mu b + (1 - tau) g                  (later steps)
    d <- g + mu b  if nesterov  else  b      (d = g when mu = 0)
    p <- p - lr d

Adam (Kingma & Ba 2015; lambda added to the gradient, "L2 regularisation")::

    g <- g + lambda p
    m <- beta1 m + (1 - beta1) g             v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

AdamW (Loshchilov & Hutter 2019; decay decoupled from the gradient)::

    p <- p (1 - lr lambda), then the Adam step with lambda = 0

SGD's step is one kernel call per 16 parameters (``kernels/sgd/``, ``sgd_steps``): a single
pass over each that reads p, g and b and writes p and b, on the kernels of the memory that
holds them. Adam and AdamW are NumPy (or CuPy) expressions.

Schedules set ``optimizer.lr`` from the base rate and the step count; call
``scheduler.step()`` once after each ``optimizer.step()``.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend, capture


class Optimizer:
    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[int, dict] = {}
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self._count_step()
        capture.on_replay(self._count_step)  # a replayed step counts too (minseg/capture.py)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                state = self.state.get(i)
                if state is None:
                    state = self.state[i] = {}
                self._update(p.data, p.grad.data, state)
        self._finish_step()

    def _count_step(self) -> None:
        self.steps += 1

    def _update(self, p, g, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish_step(self) -> None:
        """Runs after every parameter's ``_update``: an optimizer that gathers the updates (SGD) makes them here."""

    def state_dict(self) -> dict:
        """lr, step count and per-parameter buffers (as NumPy arrays), for checkpoints."""
        return {
            "lr": self.lr,
            "steps": self.steps,
            "state": {i: {k: backend.to_numpy(v).copy() if hasattr(v, "shape") else v for k, v in s.items()} for i, s in self.state.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.steps = float(state["lr"]), int(state["steps"])
        self.state = {}
        for i, s in state["state"].items():
            i = int(i)
            if i >= len(self.params):
                raise ValueError(f"optimizer state has an entry for parameter {i}, but there are only {len(self.params)}")
            self.state[i] = {}
            for k, v in s.items():
                if hasattr(v, "shape") and v.shape != self.params[i].shape and v.ndim:
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape {v.shape}, expected {self.params[i].shape}")
                if hasattr(v, "shape") and v.ndim:
                    # in the parameter's dtype and C-contiguous, as torch casts state to its parameter
                    # (the SGD kernels update the momentum buffer in place through a flat view), and a
                    # copy: the kernels write it, so it must not be the caller's array (one state dict
                    # loaded into two optimizers made them share, and each step both, their buffers)
                    v = backend.to_backend_array(v).astype(self.params[i].dtype, order="C", copy=True)
                self.state[i][k] = v


class SGD(Optimizer):
    # read by the kernels when they run (a one-element array, below): a replayed step (minseg/capture.py)
    # follows a schedule without being captured again
    read_at_replay = ("lr",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, dampening: float = 0.0):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        super().__init__(params, lr)
        # Python floats and a bool: the kernels compile once for these types
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.nesterov, self.dampening = bool(nesterov), float(dampening)
        self._rate = np.empty(1)  # self.lr as the kernels get it: an array they read when they run

    def step(self) -> None:
        """One kernel call per 16 parameters (``sgd_steps``, kernels/sgd/): read p, g and the buffer,
        write p and the buffer, where the same rule in NumPy calls is 2-9 passes and temporaries per
        parameter. ``_update`` checks each parameter and adds it to its group -- by the type of its
        memory (hence its kernels) and by whether its buffer is new; a model's are all alike: one
        group -- and ``_finish_step`` makes one call per group."""
        self._groups = {}  # (array type, first_step) -> (params, grads, buffers)
        super().step()

    def _update(self, p, g, state):
        if g.shape != p.shape:
            raise ValueError(f"SGD: a parameter of shape {p.shape} has a gradient of shape {g.shape}")
        if not p.flags.c_contiguous:  # the kernels write p through a flat view of its memory
            raise ValueError(f"SGD: a parameter of shape {p.shape} is not C-contiguous (strides {p.strides})")
        buf, first_step = None, False
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:  # b = g on the first step: the kernel fills it, so empty is enough
                buf = state["momentum_buffer"] = backend.array_module(p).empty_like(p)
                first_step = True
        group = self._groups.get((type(p), first_step))
        if group is None:
            group = self._groups[type(p), first_step] = ([], [], [])
        group[0].append(p)
        group[1].append(g)
        group[2].append(buf)

    def _finish_step(self):
        groups, self._groups = self._groups, {}
        self._write_rate()
        capture.on_replay(self._write_rate, reads=(self._rate,))  # a replay writes the rate of its step too
        for (_, first_step), (params, grads, buffers) in groups.items():
            backend.kernels_for(params[0]).sgd_steps(params, grads, buffers, self._rate, self.momentum, self.dampening,
                                                     self.weight_decay, self.nesterov, first_step)

    def _write_rate(self):
        self._rate[0] = self.lr


class Adam(Optimizer):
    decoupled = False  # AdamW sets True: weight decay acts on p directly, not through g

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay

    def _update(self, p, g, state):
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        if "exp_avg" not in state:
            xp = backend.array_module(p)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p)
            state["exp_avg_sq"] = xp.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        step_size = self.lr / (1 - b1**t)
        denom = backend.array_module(p).sqrt(v) / math.sqrt(1 - b2**t) + self.eps
        p -= step_size * m / denom


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


class LRSchedule:
    """Sets ``optimizer.lr = base_lr * factor(step)``; ``step()`` advances one iteration."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, int(total_steps), int(warmup_steps)
        self.base_lr = optimizer.lr
        self.last_step = 0
        self._apply()

    def factor(self, progress: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self):
        t = self.last_step
        if t < self.warmup_steps:  # linear warm-up from base/warmup to base
            f = (t + 1) / self.warmup_steps
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            f = self.factor(min(1.0, (t - self.warmup_steps) / span))
        self.optimizer.lr = self.base_lr * f

    def step(self):
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr, self.last_step = float(state["base_lr"]), int(state["last_step"])
        self._apply()


class CosineLR(LRSchedule):
    """lr = min_lr + (base - min_lr) (1 + cos(pi s)) / 2 at progress s = t / T (torch's CosineAnnealingLR, closed form)."""

    def __init__(self, optimizer, total_steps, min_lr: float = 0.0, warmup_steps: int = 0):
        self.min_lr = min_lr
        super().__init__(optimizer, total_steps, warmup_steps)

    def factor(self, s):
        m = self.min_lr / self.base_lr if self.base_lr else 0.0
        return m + (1 - m) * (1 + math.cos(math.pi * s)) / 2


class PolyLR(LRSchedule):
    """lr = base (1 - s)^power at progress s = t / T (torch's PolynomialLR; DeepLab's "poly")."""

    def __init__(self, optimizer, total_steps, power: float = 0.9, warmup_steps: int = 0):
        self.power = power
        super().__init__(optimizer, total_steps, warmup_steps)

    def factor(self, s):
        return (1 - s) ** self.power


SCHEDULES = {"cosine": CosineLR, "poly": PolyLR}

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "OPTIMIZERS", "LRSchedule", "CosineLR", "PolyLR", "SCHEDULES"]
