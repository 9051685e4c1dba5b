"""minseg's benchmark suite: every op and a whole U-Net training step against PyTorch.

Run it as ``python -m benchmarks ops|train|gpu|ddp`` (or ``minseg bench ...``)::

    python -m benchmarks ops                      # the hot ops, numpy / cpu backends vs torch CPU
    python -m benchmarks ops --layers --backends cpu   # every conv layer of the benchmark U-Net, % of peak
    python -m benchmarks train                    # one U-Net training step (forward, backward, SGD)
    python -m benchmarks gpu --all OUTDIR         # every GPU check: tests on the card, kernels vs cuDNN, a step
    python -m benchmarks ddp                      # a U-Net step on 1 process vs 2 MPI ranks (ddp.py)
    python -m benchmarks ops --json out.json --repeat 30 --backends numpy,cpu
    python -m benchmarks ops --quick              # tiny shapes, 2 repeats: checks that it runs

On a GPU, run ``python -m benchmarks gpu --all OUTDIR`` first (``gpu.py``): every GPU check in
~6 minutes -- the CUDA tests with the simulator off, the copy-bandwidth ceiling, launch overhead,
every version of every cuda kernel against cuDNN/torch CUDA, a U-Net step -- writing
``OUTDIR/gpu.json`` and ``OUTDIR/gpu.md`` after every case. ``gpu --simulate --all OUTDIR``
runs the same code on a CPU under the CUDA simulator (tiny shapes). Without a GPU,
``python -m benchmarks.ptx_report`` prints each CUDA kernel's registers, spills, shared memory,
occupancy and inner-loop instruction mix.

How the numbers are taken (``timing.py``):

* every implementation of a case runs in the **same process** with the **same
  thread count** (torch intra-op threads = Numba threads = BLAS threads);
* calls are **interleaved** (numpy, cpu, torch, numpy, cpu, torch, ...) so a
  noisy neighbour or a clock change hits every implementation alike;
* the first call of each implementation is timed on its own: for the ``cpu``
  backend it holds the Numba compilation (or the load from Numba's on-disk
  cache), reported as *first - median* and as the time Numba spent compiling;
* after warm-up, the **median** and the min-max of the timed calls are
  reported, with the ratio minseg / torch and GFLOP/s for convolutions.

Each implementation's outputs and gradients from its first call are compared
with torch's ('rel err' column), so a table never times a different computation.
After a run that used the ``cpu`` backend, a second process repeats the first
calls: with Numba's ``cache=True`` it must compile nothing.

Limits: before the cases run, the benchmark measures this machine's FP32 peak
(the best large SGEMM of numpy's BLAS and torch's) and its memory bandwidth (a
parallel copy); the '% peak' and '% bw' columns put each FLOP-counted or
byte-counted row against them (``machine.limits``). ``ops --only conv2d`` with
the cpu backend times every numbered CPU conv version (``cpu vK`` rows,
``kernels/conv2d/cpu.py``); ``ops --layers`` times every conv layer of the
benchmark U-Net as its training step runs it (forward + the gradients it needs); ``train --conv-versions 4`` adds a step with the
conv kernels at version 4. ``train`` also reports each side's peak RSS of
training (in a fresh process each) and minseg's time outside the backend's
kernels (graph walk, ``Function.apply``, checks, allocation, optimizer), how much
of the time inside is compiled (Numba) code and how much the kernel functions'
own Python and NumPy host code, then where the time inside goes: each kernel
function's ms per step, slowest first. ``--plot FILE.png`` draws the ratios to
torch and the % of the limits (Pillow), and for ``train`` a bar of where a
step's time goes.

Environment: the header prints the CPU, the BLAS libraries with the kernels
they picked (threadpoolctl), torch's MKL/oneDNN and every thread count.
``--unset-openblas-coretype`` re-runs without ``OPENBLAS_CORETYPE`` (which forces
OpenBLAS onto another CPU's kernels), ``--malloc-tune`` re-runs with glibc
keeping freed memory for reuse (fewer page faults, for both sides).

Files: ``machine.py`` (what ran), ``timing.py`` (how it is timed, the table),
``cases.py`` (the op cases), ``train.py`` (the U-Net step and its torch twin),
``gpu.py`` (the GPU mode), ``ddp.py`` (data-parallel over MPI ranks, and the cost model
for W machines), ``plot.py`` (``--plot``), ``__main__.py`` (the command line).
``RESULTS.md`` records measured tables with the machine they ran on.
"""
