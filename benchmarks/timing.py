"""Timing: interleaved calls, first call apart, medians, and the table.

A *case* (one op at one size) has several *implementations* (minseg 'numpy',
minseg 'cpu', torch, ...). :func:`measure` times them like this::

    first call of each implementation      -> first_call_s, Numba compile time, outputs compared
    warm-up: (warmup - 1) more calls each  -> discarded
    repeat x (impl 1, impl 2, impl 3)      -> the timed calls, interleaved

Interleaving spreads slow phases of the machine (another process, a frequency
change) over every implementation instead of charging them to whichever ran
then. The median resists the outliers that remain; min-max shows the spread.

The first call is where Numba compiles (or loads its on-disk cache): a Numba
event listener measures the time spent compiling and counts the functions
compiled, so compile time is reported apart from run time.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numba.core import event as numba_event


def cpu_clock(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Wall time of fn() on the host, the minor page faults it caused, and what it returned."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, out


def _noop():
    pass


@dataclass
class Impl:
    """One implementation of a case.

    ``run()`` does one call and returns the arrays to compare (kept alive until
    the clock has stopped, so freeing them is not timed); ``reset()`` runs
    untimed before every call (it drops accumulated gradients); ``clock``
    times a call (host clock, or CUDA events on a GPU); ``to_numpy`` turns one
    returned value into a NumPy array for the comparison.
    """

    name: str
    run: Callable[[], list]
    to_numpy: Callable[[Any], np.ndarray]
    reset: Callable[[], None] = _noop
    clock: Callable = cpu_clock


@dataclass
class Case:
    name: str
    impls: list[Impl]
    flops: float | None = None  # floating-point operations of one call (GFLOP/s column)
    nbytes: float | None = None  # fewest bytes one call must read + write (GB/s column)
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it is absent


class CompileMeter(numba_event.Listener):
    """Counts Numba compilations and the wall time spent in them (nested compiles counted once in time)."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._depth = 0

    def on_start(self, event):
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1
        self.count += 1

    def on_end(self, event):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0


def metered(fn, meter: CompileMeter):
    with numba_event.install_listener("numba:compile", meter):
        return fn()


def relative_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """max over outputs of ||a - b|| / ||b|| (inf on a shape mismatch, nan if anything is nan)."""
    worst = 0.0
    for a, b in zip(actual, expected):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        scale = np.linalg.norm(b)
        err = np.linalg.norm(a - b) / (scale if scale > 0 else 1.0)
        if np.isnan(err):
            return float("nan")
        worst = max(worst, float(err))
    return worst


def measure(case: Case, repeat: int, warmup: int, reference: str | None = None) -> dict:
    """Time every implementation of ``case`` (see the module docstring).

    Returns a JSON-able ``{'case', 'flops', 'nbytes', 'reference', 'results': {impl: {...}}, 'skipped'}``.
    An implementation whose first call raises is moved to 'skipped' with the error.
    ``reference`` names the implementation the others' outputs are compared with
    (default: torch if present, else the first); 'rel_err' is ||out - ref|| / ||ref||,
    the worst over the output and every gradient.
    """
    entry = dict(case=case.name, flops=case.flops, nbytes=case.nbytes, reference=None, results={}, skipped=dict(case.skipped))
    res, outputs, impls = entry["results"], {}, []
    for impl in case.impls:
        impl.reset()
        meter = CompileMeter()
        try:
            seconds, _, out = metered(lambda: impl.clock(impl.run), meter)
            outputs[impl.name] = [impl.to_numpy(o) for o in out]
        except Exception as e:  # a kernel that cannot run this case: report, keep the others
            entry["skipped"][impl.name] = f"first call raised {type(e).__name__}: {e}"
            continue
        del out
        impls.append(impl)
        res[impl.name] = dict(first_call_s=seconds, numba_compile_s=meter.seconds, numba_compiles=meter.count)
    if not impls:
        return entry
    names = [impl.name for impl in impls]
    reference = reference if reference in names else "torch" if "torch" in names else names[0]
    entry["reference"] = reference
    for name in names:
        res[name]["rel_err"] = relative_error(outputs[name], outputs[reference])
    del outputs

    later = {name: CompileMeter() for name in names}
    times = {name: [] for name in names}
    faults = {name: [] for name in names}
    for rnd in range(max(warmup - 1, 0) + max(repeat, 1)):
        for impl in impls:
            impl.reset()
            seconds, nfaults, out = metered(lambda: impl.clock(impl.run), later[impl.name])
            del out
            if rnd >= warmup - 1:
                times[impl.name].append(seconds)
                faults[impl.name].append(nfaults)

    torch_median = float(np.median(times["torch"])) if "torch" in times else None
    for name in names:
        r, t = res[name], np.asarray(times[name])
        median = float(np.median(t))
        r.update(
            median_s=median,
            min_s=float(t.min()),
            max_s=float(t.max()),
            times_s=[float(v) for v in t],
            first_minus_median_s=r["first_call_s"] - median,
            page_faults_per_call=None if faults[name][0] is None else float(np.median(faults[name])),
            later_numba_compiles=later[name].count,
            ratio_vs_torch=median / torch_median if torch_median else None,
            gflops=case.flops / median / 1e9 if case.flops else None,
            gbytes_per_s=case.nbytes / median / 1e9 if case.nbytes else None,
        )
    return entry


# ------------------------------------------------------------------------ the table

COLUMNS = (
    ("case", None),
    ("impl", None),
    ("median ms", lambda r: f"{r['median_s'] * 1e3:.3f}"),
    ("min-max ms", lambda r: f"{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}"),
    ("x torch", lambda r: "-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}"),
    ("GFLOP/s", lambda r: "-" if r["gflops"] is None else f"{r['gflops']:.3g}"),
    ("GB/s", lambda r: "-" if r["gbytes_per_s"] is None else f"{r['gbytes_per_s']:.3g}"),
    ("% peak", lambda r: "-" if r.get("pct_peak") is None else f"{r['pct_peak']:.1f}"),
    ("% bw", lambda r: "-" if r.get("pct_bandwidth") is None else f"{r['pct_bandwidth']:.1f}"),
    ("% bound", lambda r: "-" if r.get("pct_bound") is None else f"{r['pct_bound']:.1f}"),
    ("first-median ms", lambda r: f"{r['first_minus_median_s'] * 1e3:.1f}"),
    ("jit s (fns)", lambda r: f"{r['numba_compile_s']:.2f} ({r['numba_compiles']})" if r["numba_compiles"] else "-"),
    ("faults/call", lambda r: "-" if r["page_faults_per_call"] is None else f"{r['page_faults_per_call']:.0f}"),
    ("rel err", lambda r: f"{r['rel_err']:.1e}"),
)


def add_limits(entries: list[dict], lim: dict | None) -> None:
    """Set each result's 'pct_peak' (GFLOP/s over the measured FP32 peak) and 'pct_bandwidth'
    (GB/s over the measured copy bandwidth), where the case has flops or bytes; where it has both,
    'pct_bound': GFLOP/s over the roofline's bound, min(peak, FLOPs per byte x bandwidth) -- the
    share of what the machine allows for that much arithmetic on that much memory."""
    for entry in entries:
        for r in entry["results"].values():
            r["pct_peak"] = 100 * r["gflops"] / lim["fp32_peak"]["gflops"] if lim and r.get("gflops") else None
            r["pct_bandwidth"] = 100 * r["gbytes_per_s"] / lim["bandwidth"]["gbytes_per_s"] if lim and r.get("gbytes_per_s") else None
            r["pct_bound"] = None
            if r["pct_peak"] is not None and r["pct_bandwidth"] is not None:
                bound = min(lim["fp32_peak"]["gflops"], entry["flops"] / entry["nbytes"] * lim["bandwidth"]["gbytes_per_s"])
                r["pct_bound"] = 100 * r["gflops"] / bound


def table(results: list[dict]) -> str:
    """A fixed-width text table of :func:`measure` entries.

    Columns without any value (e.g. GB/s on the CPU) are left out.
    """
    rows = []
    for entry in results:
        for impl, r in entry["results"].items():
            rows.append([entry["case"], impl] + [fmt(r) for _, fmt in COLUMNS[2:]])
        for impl, why in entry.get("skipped", {}).items():
            rows.append([entry["case"], impl, f"skipped: {why}"] + [""] * (len(COLUMNS) - 3))
    heads = [name for name, _ in COLUMNS]
    keep = [i for i in range(len(heads)) if i < 3 or any(row[i] not in ("-", "") for row in rows)]
    heads = [heads[i] for i in keep]
    rows = [[row[i] for i in keep] for row in rows]
    timed = [row for row in rows if not row[2].startswith("skipped")]
    widths = [max([len(h)] + [len(row[i]) for row in timed]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    previous = None
    for row in rows:
        case = row[0] if row[0] != previous else ""
        previous = row[0]
        if row[2].startswith("skipped"):
            lines.append(f"{case.ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip([case] + row[1:], widths)))
    return "\n".join(lines)
