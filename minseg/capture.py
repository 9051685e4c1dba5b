"""Record a training step's compiled calls once, then replay them: the cpu backend's CUDA graphs.

Read this after ``tensor.py`` and ``autograd.py``: it is an optimisation, not part of the math.

**Why.** A training step of the benchmark U-Net is 33 compiled (Numba) calls glued together by
Python: module calls, ``Function.apply``, argument checks, the graph walk, the kernel functions'
layout checks and allocation. Between the kernels that Python runs with cold caches, and it is
about a tenth of the step (``python -m benchmarks train`` prints the split: the 'cpu' row's time
outside the kernel functions and in their host code; benchmarks/RESULTS.md). Yet every step makes
the same calls: the same kernels, with arrays of the same shapes.
So record the calls once -- which compiled function, with which arguments -- and from then on
make only those calls, with the new batch copied into the arrays the recorded step read. This is
what CUDA graphs do for a GPU's launches (``torch.cuda.CUDAGraph``).

**Recording.** Each Numba dispatcher that is a global of a ``kernels`` module is swapped for a
wrapper that runs it and appends ``(function, args, kwargs, result)`` to a tape, while the step
runs eagerly (a kernel function's Python looks its kernels up as globals at each call, so the swap
reroutes them; compiled code calling compiled code runs inside the recorded call). The tape keeps
every argument alive: the inputs, the activations, the gradients, the parameters. A replay calls
each function again with those very arrays; a call that returned arrays it allocated (a kernel
that owns its output) writes new ones, which are copied into the recorded ones that later calls
read. Two things make a replay cheaper still: it calls each function's compiled entry point
directly, skipping the dispatcher's type checks of every argument (``_Tape.freeze``), and the
large arrays of the tape share memory where their lifetimes in the step do not overlap, as the
eager step's allocator lets them (``_Tape.plan``).

**What a replay cannot see, and what this module does about it.**

* Python work a step does besides its compiled calls, which a replay must redo: the code that
  does it registers it with :func:`on_replay` while the step is recorded, and a replay runs it at
  the same point of the step. ``optimizer.steps`` and BatchNorm's ``num_batches_tracked`` count
  this way; ``functional.cross_entropy`` checks its kernel's count of out-of-range targets this
  way, so a bad target raises the eager step's error.
* NumPy work between the compiled calls (a copy, an addition outside a kernel): it is not on the
  tape, so a replay would reuse its recorded result. **Validation** catches it: right after the
  recording, the tape is replayed from the state the eager step before it started from, on that
  step's batch (which must differ from the recorded one), and must end with that step's
  parameters, buffers, optimizer state, gradients and loss, bit for bit; then the recorded step's
  state is put back. Otherwise the step stays eager for good and :attr:`CapturedStep.reason` says
  what differed.
  (The walk's in-place gradient sums, ``tensor._private``, count references; the tape's own
  references are subtracted while recording, or every such sum would become a NumPy ``prev + ig``.)
* Settings the kernels get as arguments: the optimizer's (``momentum``..., and ``lr`` where the
  optimizer does not hand it over in an array the kernels read when they run, as SGD does:
  ``read_at_replay``) are compared before each replay, and a changed one means a new capture; any
  attribute set on a module (BatchNorm's ``momentum``), a module in another train/eval mode than
  recorded, and parameters, buffers or optimizer state replaced (``load_state_dict``) do too. So do new input shapes or
  dtypes (each keeps its own tape; the last ``KEEP`` are kept). A module's registry written
  directly (``m._parameters[...] = ...``) is not seen.
* What validation cannot see: a step whose Python acts only now and then (every N steps, or on
  rare data) behaves in its one validated replay as eagerly, and then not. Capture steps that do
  the same work every time, as a training step does; register work that must be redone with
  :func:`on_replay`.

**Cost.** The first call of each input shape runs eagerly (it may compile kernels: recording then
would record the compilation's view of the globals), the second too, keeping what validation
compares against, the third records and validates (one replay more), later ones replay. The
tape's arrays stay allocated between steps (about what the eager step holds at its peak);
recording holds more for a moment (every array of the step at once): the 'cpu captured' row of
``python -m benchmarks train`` reports that peak apart.

Only the ``cpu`` backend is captured; on others :class:`CapturedStep` runs its step eagerly.
"""
from __future__ import annotations

import collections
import functools
import operator
import sys

import numpy as np

from . import backend, runtime
from .tensor import Tensor

# the module itself: ``minseg.tensor`` is also the name of the function that makes a Tensor
tensor_module = sys.modules[Tensor.__module__]

__all__ = ["CapturedStep", "on_replay", "kernel_dispatchers", "set_kernel_globals"]

CAPTURED_BACKENDS = ("cpu",)
KEEP = 2  # input shapes whose tapes are kept
_TRAINING, _DATA = operator.attrgetter("training"), operator.attrgetter("data")


def kernel_dispatchers() -> dict:
    """{(module, name): dispatcher} of every Numba dispatcher that is a global of a loaded module of
    the ``kernels`` package: what the kernel functions' Python calls (a global is looked up at each
    call, so replacing it reroutes the call; compiled code calling compiled code is not seen)."""
    from numba.core.dispatcher import Dispatcher

    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is not None and (module_name == "kernels" or module_name.startswith("kernels.")):
            for name, value in vars(module).items():
                if isinstance(value, Dispatcher):
                    found[(module, name)] = value
    return found


def set_kernel_globals(functions: dict) -> None:
    """Set each ``(module, name)`` global to its function (``kernel_dispatchers`` gives the originals)."""
    for (module, name), fn in functions.items():
        setattr(module, name, fn)


# ------------------------------------------------------------------------------- the tape


class _Tape:
    """The calls of one recorded step, and the checks that follow some of them."""

    def __init__(self):
        self.calls = []  # (function, args, kwargs, result)
        self.hooks = {}  # number of calls made before them -> Python work a replay redoes there (on_replay)
        self.refs = collections.Counter()  # id(array) -> references the tape holds to it
        self.views = collections.defaultdict(list)  # id(base) -> the views of it that the tape holds
        self.reads = []  # arrays on_replay work reads
        self.planned = False  # plan() moved the arrays
        self._program = self._program_of = None  # replay()'s list of callables, and the calls it was made from
        self.saved_bytes = 0

    def add(self, fn, args, kwargs, result):
        self.calls.append((fn, args, kwargs, result))
        for a in _arrays_in((args, kwargs, result)):
            self.refs[id(a)] += 1
            if isinstance(a.base, np.ndarray) and self.refs[id(a)] == 1:
                self.views[id(a.base)].append(a)

    def freeze(self):
        """Resolve each call to its compiled entry point (``dispatcher.overloads[signature]``): a replay
        passes the very objects the recorded call got, so the dispatcher's work -- working out the
        Numba type of every argument and picking the compiled version -- would find the same answer
        every time. (Estimate from one scratch measurement: replaying the benchmark U-Net's step
        through the dispatchers took 1.3 ms longer, ~40 us per call; the calls with ~30 array
        arguments cost the most.)"""
        frozen = []
        for fn, args, kwargs, result in self.calls:
            entry = None
            if not kwargs and hasattr(fn, "overloads"):
                compiled = fn.overloads.get(tuple(fn.typeof_pyval(a) for a in args))
                entry = None if compiled is None else compiled.entry_point
            frozen.append((entry or fn, args, kwargs, result))
        self.calls = frozen

    def plan(self, pinned: list) -> int:
        """Let the step's large arrays share memory where their lifetimes in the step do not overlap.

        The eager step frees each activation and gradient when the walk is done with it, and the
        allocator hands the (cache-warm) memory to the next array of that size. A tape keeps every
        array of the recorded step instead: more memory than the eager step ever holds at once, and
        in one scratch measurement its replayed kernels each ran a few % slower than the eager ones
        (an estimate; with this plan they ran as fast).

        So an array's memory (its owner's) is live from the first recorded call that takes it to the
        last. Walking the calls in order, a new owner moves into the smallest freed block it fits in
        (of equal ones the last freed, as malloc would), or keeps its own memory, which becomes a
        block for others once it is done. Nothing is allocated; the owners that moved are let go.
        Every recorded array is rebuilt on its owner's block: the same shape, strides, dtype, offset
        and address modulo ALIGN, so the same Numba type (checked).

        Left where they are: ``pinned`` (parameters, buffers, optimizer state, inputs, the loss and
        the gradients, what ``on_replay`` work reads); any memory a non-float array lives in (an
        index table with garbage in it would make a kernel read out of bounds: a crash, not a
        difference validation could report); and owners under ``PLAN_MIN_BYTES`` (the tables and
        constants a kernel function fills before its call live among those, and a shared block would
        not keep their content; a larger float one shows up in validation, and the step is then
        recorded again without a plan). Returns the bytes saved."""
        from numba import typeof

        pinned_owners = {id(_owner(a)) for a in pinned if isinstance(a, np.ndarray)}
        owners, first, last = {}, {}, {}
        for k, (_, args, kwargs, result) in enumerate(self.calls):
            for a in _arrays_in((args, kwargs, result)):
                o = _owner(a)
                if o is None or id(o) in pinned_owners:
                    continue
                if a.dtype.kind != "f" or o.nbytes < PLAN_MIN_BYTES or not o.flags.c_contiguous:
                    # an integer array may be an index table: garbage there would make a kernel read out
                    # of bounds (a crash, not a difference validation could report). Left alone.
                    pinned_owners.add(id(o))
                    owners.pop(id(o), None)
                    continue
                owners[id(o)] = o
                first.setdefault(id(o), k)
                last[id(o)] = k
        starts, ends = collections.defaultdict(list), collections.defaultdict(list)
        for oid in owners:
            starts[first[oid]].append(oid)
            ends[last[oid]].append(oid)
        free, blocks, block_of, kept, moved = [], {}, {}, 0, 0
        for k in range(len(self.calls)):
            for oid in starts[k]:
                o = owners[oid]
                fits = [i for i, b in enumerate(free) if b.nbytes >= o.nbytes + _shift(b, o)]
                if fits:  # the smallest free block it fits in; of equal ones the last freed
                    block = free.pop(min(reversed(fits), key=lambda i: free[i].nbytes))
                    blocks[oid] = _aligned_like(block, o)
                    moved += 1
                else:  # none free: it keeps its own memory, which becomes a block when it is done
                    block = blocks[oid] = o.reshape(-1).view(np.uint8)
                    kept += o.nbytes
                block_of[oid] = block
            for oid in ends[k]:
                free.append(block_of[oid])
        rebuilt = {}

        def rebuild(a):
            o = _owner(a)
            if o is None or id(o) not in blocks:
                return a
            if id(a) not in rebuilt:
                new = np.ndarray(a.shape, a.dtype, buffer=blocks[id(o)], offset=a.ctypes.data - o.ctypes.data,
                                 strides=a.strides)
                new.flags.writeable = a.flags.writeable
                if typeof(new) != typeof(a):
                    raise _PlanError(f"{typeof(new)} != {typeof(a)}")
                rebuilt[id(a)] = new
            return rebuilt[id(a)]

        try:
            calls = [(fn, _map_arrays(args, rebuild), _map_arrays(kwargs, rebuild), _map_arrays(result, rebuild))
                     for fn, args, kwargs, result in self.calls]
        except _PlanError:
            return 0
        self.calls, self.planned = calls, moved > 0  # the owners that moved are let go with the old calls
        return sum(o.nbytes for o in owners.values()) - kept

    def replay(self):
        if self._program_of is not self.calls:
            self._program, self._program_of = self._make_program(), self.calls
        for work in self._program:
            work()

    def _make_program(self) -> list:
        """The replay as one list of argument-less callables, in order: each call bound to its arguments
        (``functools.partial``, called from C), the on_replay work between them, and the copies of
        returned arrays. The loop that runs it then does next to nothing in Python: Python between
        kernels runs with cold caches, several times slower than the same lines alone (measured:
        replay() spent ~0.35 ms outside its calls per U-Net step when it unpacked each entry itself)."""
        program = []
        for i, (fn, args, kwargs, result) in enumerate(self.calls):
            program.extend(self.hooks.get(i, ()))
            call = functools.partial(fn, *args, **kwargs)
            if result is None:
                program.append(call)
            else:
                program.append(functools.partial(_call_and_copy, call, result))
        program.extend(self.hooks.get(len(self.calls), ()))
        return program


PLAN_MIN_BYTES = 1 << 16  # smaller arrays keep their own memory in a tape (see _Tape.plan)
ALIGN = 64  # bytes: a planned array keeps its address modulo this (AVX-512 loads, cache lines)


class _PlanError(Exception):
    pass


def _owner(a):
    """The array that owns ``a``'s memory (NumPy points a view's ``base`` at it), or None when the
    memory belongs to something else (a buffer object)."""
    base = a.base
    if base is None:
        return a
    return base if isinstance(base, np.ndarray) and base.base is None else None


def _shift(block, owner) -> int:
    """Bytes into ``block`` where ``owner``'s copy starts at the same address modulo ALIGN."""
    return (owner.ctypes.data - block.ctypes.data) % ALIGN


def _aligned_like(block, owner):
    """``owner.nbytes`` bytes of ``block`` starting at the same address modulo ALIGN as ``owner``."""
    shift = _shift(block, owner)
    return block[shift: shift + owner.nbytes]


def _arrays_in(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays_in(v)


def _map_arrays(value, fn):
    if isinstance(value, np.ndarray):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_arrays(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_arrays(v, fn) for k, v in value.items()}
    return value


def _call_and_copy(call, recorded):
    _copy_into(recorded, call())


def _copy_into(recorded, new):
    """Write a replayed call's newly allocated results into the recorded arrays later calls read."""
    if isinstance(recorded, np.ndarray):
        if recorded is not new:
            np.copyto(recorded, new)
    elif isinstance(recorded, (tuple, list)):
        for r, n in zip(recorded, new):
            _copy_into(r, n)


_recording: _Tape | None = None


def on_replay(work, reads=()) -> None:
    """Python work of a step that a replay must redo: ``work()`` runs on every replay of the step
    being recorded, at this point of it (after the compiled calls made so far, before the next).

    For state the step keeps in Python (``optimizer.steps``, BatchNorm's ``num_batches_tracked``)
    and for checks of a kernel's result (``functional.cross_entropy`` raises on a count of
    out-of-range targets): a check must read the arrays the kernel wrote, not values computed
    from them, so that a replay sees the new ones; ``reads`` names those arrays (a replay must not
    move them: ``_Tape.plan``). Outside a recording it does nothing."""
    tape = _recording
    if tape is not None:
        tape.hooks.setdefault(len(tape.calls), []).append(work)
        tape.reads.extend(reads)


def _extra_references(a) -> int:
    """References to ``a`` that exist only because the tape keeps the recorded arguments alive
    (``tensor._private`` subtracts them): the tape's own, and one from each view of ``a`` (a reshape
    a kernel function made for its kernel) that nothing but the tape holds."""
    tape = _recording
    if tape is None:
        return 0
    extra = tape.refs.get(id(a), 0)
    for view in tape.views.get(id(a), ()):
        # held by: the tape's references, its views list, this loop's variable, getrefcount's argument
        if sys.getrefcount(view) == tape.refs[id(view)] + 3:
            extra += 1
    return extra


def _record(step, args) -> tuple[_Tape, object]:
    """Run ``step(*args)`` eagerly with every kernel dispatcher call recorded."""
    global _recording
    tape = _Tape()
    dispatchers = kernel_dispatchers()

    def recorder(fn):
        def call(*a, **k):
            out = fn(*a, **k)
            tape.add(fn, a, k, out)
            return out

        return call

    set_kernel_globals({key: recorder(fn) for key, fn in dispatchers.items()})
    _recording, tensor_module._extra_references = tape, _extra_references
    try:
        result = step(*args)
    finally:
        set_kernel_globals(dispatchers)
        _recording, tensor_module._extra_references = None, None
        tape.refs = tape.views = None  # only needed while recording (and they hold views)
    return tape, result


# ----------------------------------------------------------------------- the captured step


class _Capture:
    """One input shape's static inputs, tape and the recorded step's gradients and loss."""

    def __init__(self, x, target):
        self.x, self.target = np.empty_like(x), np.empty_like(target)
        self.calls = 0
        self.tape = None
        self.grads = None  # [(parameter, its recorded .grad Tensor)]
        self.tensors = self.arrays = None  # the parameters and buffers, and their arrays when recorded
        self.modules = self.modes = None  # the modules, and their train/eval modes when recorded
        self.edits = self.optimizer_state = None
        self.loss = None  # the recorded loss's array (the replay rewrites it)
        self.plan = True  # let the tape's arrays share memory (_Tape.plan)
        # validation's reference, from the eager step before the recorded one (_prepare)
        self.before = self.expected = self.expected_names = None
        self.prepared_x = self.prepared_target = self.prepared_live = None

    def remember(self, step):
        """What the tape depends on besides its arguments' values: see ``unchanged``."""
        from .nn.module import Module

        self.edits = Module.edits
        self.modules = list(step.model.modules())
        self.modes = [m.training for m in self.modules]
        self.tensors = [*step.model.parameters(), *(b for _, b in step.model.named_buffers())]
        self.arrays = [t.data for t in self.tensors]
        self.optimizer_state = (step.optimizer.state, step.optimizer.params, len(step.optimizer.state))

    def unchanged(self, step) -> bool:
        """The model as recorded (no module attribute set or deleted: ``Module.edits``; every module in the
        recorded train/eval mode, so an evaluation between epochs costs no new capture), its parameters' and
        buffers' arrays the recorded ones (``load_state_dict`` replaces them) and the optimizer's state the
        recorded dict (its ``load_state_dict`` makes a new one). A few microseconds: the arrays are
        compared by identity, not read."""
        from .nn.module import Module

        state, params, size = self.optimizer_state
        o = step.optimizer
        # map/all run in C: this runs right after a replay's last kernel, when Python is slowest
        return (Module.edits == self.edits and o.state is state and o.params is params and len(state) == size
                and all(map(operator.is_, map(_TRAINING, self.modules), self.modes))
                and all(map(operator.is_, map(_DATA, self.tensors), self.arrays)))


class CapturedStep:
    """``step(x, target) -> loss`` (zero_grad, forward, backward, optimizer step), recorded and replayed.

    ``step`` takes two Tensors and returns the loss Tensor; ``model`` and ``optimizer`` are what it
    trains (their state is what validation compares). Call the CapturedStep with NumPy arrays or
    Tensors: it returns a new loss Tensor each call (in a replay its value only: the backward and
    the update have run, there is no graph to walk), and leaves each parameter's ``.grad`` as the
    eager step would. ``mode`` is 'eager', 'recording' (and validating) or 'replay' (of the last call);
    ``reason`` says why the step is eager for good, or is None; ``notes`` what capturing gave up.

    The step must start from no gradients (``optimizer.zero_grad()`` in it, as above): a step that
    adds into gradients kept from the step before does NumPy work a replay cannot repeat, and stays
    eager (validation says so).
    """

    def __init__(self, step, model, optimizer):
        self.step, self.model, self.optimizer = step, model, optimizer
        self._captures = collections.OrderedDict()
        self.reason = None
        self.mode = None
        self.replays = 0
        self.tape = None  # the tape of the last replay (its ``calls`` list: what a profiler wraps)
        self.notes = []  # what capturing had to give up (shared memory), for the curious

    # -- the call
    def __call__(self, x, target) -> Tensor:
        x, target = _array(x, "x"), _array(target, "target")
        if backend.current().name not in CAPTURED_BACKENDS or self.reason is not None:
            self.mode = "eager"
            return self.step(Tensor(x), Tensor(target))
        key = (x.shape, x.dtype.str, target.shape, target.dtype.str, self._hyperparameters())
        cap = self._captures.pop(key, None)
        if cap is None or (cap.tape is not None and not cap.unchanged(self)):
            cap = _Capture(x, target)  # a tape would use the old arrays or settings: capture again
        self._captures[key] = cap  # most recently used last
        while len(self._captures) > KEEP:
            self._captures.popitem(last=False)
        cap.calls += 1
        np.copyto(cap.x, x)
        np.copyto(cap.target, target)
        if cap.calls == 1:  # may compile kernels: not recorded
            self.mode = "eager"
            return self._run(cap)
        if cap.tape is None:
            if cap.before is None or not cap.unchanged(self) or np.array_equal(x, cap.prepared_x) \
                    or np.array_equal(target, cap.prepared_target):
                # (the same batch again would not show a stale copy in validation: wait for another)
                return self._prepare(cap)
            return self._record_and_validate(cap)
        self.mode = "replay"
        self.replays += 1
        return self._replay(cap)

    def _run(self, cap):
        return self.step(Tensor(cap.x), Tensor(cap.target))

    def _prepare(self, cap):
        """An eager step, kept as validation's reference: the state before it (to start the replay from),
        the state and loss after it (what the replay must give), its batch and optimizer rate."""
        self.mode = "eager"
        cap.before = self._snapshot()
        live = {k: getattr(self.optimizer, k) for k in getattr(self.optimizer, "read_at_replay", ())}
        loss = self._run(cap)
        cap.expected_names, cap.expected = self._compared(loss.data)
        cap.prepared_x, cap.prepared_target, cap.prepared_live = cap.x.copy(), cap.target.copy(), live
        cap.remember(self)
        return loss

    def _record_and_validate(self, cap):
        """Record this step; then replay the tape on the batch of the step before from the state before it,
        which must give that eager step's results bit for bit; then put this step's results back."""
        self.mode = "recording"
        tape, loss = _record(self._run, (cap,))
        result = Tensor(np.array(loss.data))  # the replay below writes the loss's array
        tape.freeze()
        cap.tape, cap.loss = tape, loss.data
        cap.grads = [(p, p.grad) for p in self.model.parameters() if p.grad is not None]
        pinned = [cap.x, cap.target, loss.data, *(g.data for _, g in cap.grads), *tape.reads]
        pinned += [v for _, v in self._tracked() if isinstance(v, np.ndarray)]
        if cap.plan:
            tape.saved_bytes = tape.plan(pinned)
        del loss, pinned
        after = self._snapshot()
        live = {k: getattr(self.optimizer, k) for k in cap.prepared_live}
        self._restore(cap.before)
        np.copyto(cap.x, cap.prepared_x)
        np.copyto(cap.target, cap.prepared_target)
        for k, v in cap.prepared_live.items():  # the rate of the step before, as its eager step had it
            setattr(self.optimizer, k, v)
        try:
            replay_loss = self._replay(cap)
            replayed = self._compared(replay_loss.data)[1]
        except Exception as e:  # the eager step did not raise: a difference too
            replayed = [np.array(f"raised {type(e).__name__}: {e}")]
        finally:
            for k, v in live.items():
                setattr(self.optimizer, k, v)
            self._restore(after)
        names, expected = cap.expected_names, cap.expected
        cap.before = cap.expected = None
        differ = [n for n, a, b in zip(names, expected, replayed) if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)]
        if not differ and len(replayed) == len(expected):
            cap.remember(self)
            runtime.return_free_memory()  # replays allocate nothing: what capturing freed goes back to the OS
            return result
        cap.tape = None
        what = f"{len(differ) or 'all'} of {len(names)} entries ({', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''})"
        if tape.planned:  # perhaps an array whose content a shared block lost: record again, unplanned
            cap.plan = False
            self.notes.append(f"a replay with shared memory differed from the eager step in {what}: "
                              "recorded again, the tape keeping the recorded step's own arrays")
        else:
            self.reason = (f"a replay differed from the eager step in {what}: the step does work outside the "
                           "compiled calls; it runs eagerly")
            self._captures.clear()
        return result

    def _replay(self, cap):
        self.tape = cap.tape
        cap.tape.replay()
        for p, g in cap.grads:
            p.grad = g
        return Tensor(cap.loss.copy())

    # -- state, for validation
    def _hyperparameters(self):
        """The optimizer's settings a replay would repeat as recorded: those its kernels do not read when
        they run (``read_at_replay``: SGD's ``lr``, so a schedule needs no new capture)."""
        o = self.optimizer
        live = getattr(o, "read_at_replay", ())
        return tuple(getattr(o, k, None) for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov") if k not in live)

    def _tracked(self) -> list:
        """[(name, value)] of the state a step changes in place: parameters, buffers, optimizer state."""
        named = [(n, p.data) for n, p in self.model.named_parameters()] + [(n, b.data) for n, b in self.model.named_buffers()]
        return named + [(f"optimizer state {i} {k}", s[k]) for i, s in sorted(self.optimizer.state.items()) for k in sorted(s)]

    def _named_grads(self) -> list:
        return [(n, p.grad.data) for n, p in self.model.named_parameters() if p.grad is not None]

    def _compared(self, loss) -> tuple[list, list]:
        """(names, copies of the values) that validation compares: the tracked state, the step count, the
        step's ``loss`` and the gradients."""
        named = self._tracked() + [("optimizer steps", self.optimizer.steps), ("loss", loss)]
        named += [(f"grad of {n}", g) for n, g in self._named_grads()]
        return [n for n, _ in named], [np.array(v) for _, v in named]

    def _snapshot(self):
        """What a step may change, to put back: a copy of every array it may write in place (parameters,
        buffers, optimizer state, and the gradients kept from before: a step that adds into them writes
        those, and the tape may read them), the optimizer's step count and each parameter's ``.grad``."""
        arrays = [v for _, v in self._tracked() + self._named_grads() if isinstance(v, np.ndarray)]
        return [(a, a.copy()) for a in arrays], self.optimizer.steps, [(p, p.grad) for p in self.model.parameters()]

    def _restore(self, snapshot) -> None:
        copies, steps, grads = snapshot
        for array, copy in copies:
            np.copyto(array, copy)  # in place: the tape holds these arrays
        self.optimizer.steps = steps
        for p, g in grads:
            p.grad = g


def _array(value, name) -> np.ndarray:
    data = value.data if isinstance(value, Tensor) else value
    if not isinstance(data, np.ndarray):
        raise TypeError(f"CapturedStep: {name} must be a NumPy array or a cpu Tensor, got {type(data).__name__}")
    return data
