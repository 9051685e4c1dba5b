"""``--plot FILE.png``: the table as two bar charts, drawn with Pillow (a dependency; matplotlib is not).

One row per (case, implementation). Left: time relative to torch (median /
torch's median) on a log scale, as a bar from torch's line at 1: to the left
is faster, to the right slower (a log scale keeps 0.5x and 2x the same length,
and one slow outlier does not flatten the others). Right: how close
the implementation comes to the machine's limit that bounds the case, both
measured by the benchmark itself (``machine.limits``): % of the FP32 peak for
cases with a FLOP count (convolutions, the training step), % of the copy
bandwidth for memory-bound cases with a byte count, and for a case with both
whose roofline bound, min(peak, FLOPs per byte x bandwidth), is the bandwidth's
(the 1x1 head of ``ops --layers``), % of that bound. Values are written on the bars.
With a training step's profile (``train``), a stacked bar per implementation below:
where its step's time goes (compiled kernels, their Python host code, outside them).
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
TORCH_COLOR = (150, 150, 150)
GRID = (225, 225, 225)
INK = (20, 20, 20)
ROW, PANEL, PAD, UNIT = 24, 460, 16, 70


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _rows(entries):
    """(label, impl, ratio or None, percent or None, unit) per timed implementation."""
    rows = []
    for e in entries:
        for impl, r in e["results"].items():
            if r.get("pct_bound") is not None and r["pct_bound"] > r["pct_peak"] * (1 + 1e-9):  # memory-bound by the roofline
                pct, unit = r["pct_bound"], "% bound"
            elif r.get("pct_peak") is not None:
                pct, unit = r["pct_peak"], "% peak"
            else:
                pct, unit = r.get("pct_bandwidth"), "% bw"
            rows.append((e["case"], impl, r.get("ratio_vs_torch"), pct, unit))
    return rows


def _ticks(top, count=5):
    """Round tick values from 0 to at least ``top``."""
    step = max(top / count, 1e-9)
    magnitude = 10 ** math.floor(math.log10(step))
    for nice in (1, 2, 2.5, 5, 10):
        if nice * magnitude >= step:
            step = nice * magnitude
            break
    ticks = [0.0]
    while ticks[-1] < top:
        ticks.append(float(f"{ticks[-1] + step:.6g}"))
    return ticks


def _log_ticks(lo, hi):
    """1-2-5 ticks covering [lo, hi] (lo > 0)."""
    ticks, e = [], math.floor(math.log10(lo))
    while True:
        for m in (1, 2, 5):
            t = float(f"{m * 10.0**e:.6g}")
            if t >= lo / 5 and (not ticks or ticks[-1] < hi):
                ticks.append(t)
        if ticks and ticks[-1] >= hi:
            break
        e += 1
    while len(ticks) > 1 and ticks[1] <= lo:
        ticks.pop(0)
    return ticks


def _ratio_panel(draw, font, x0, y0, values, title, colors):
    """Bars from 1 (torch) to each ratio on a log axis; None or <= 0: '-'."""
    known = [v for v in values if v is not None and v > 0]
    ticks = _log_ticks(min(known + [0.5]), max(known + [2.0]))  # at least 0.5 .. 2 around torch
    lo, hi = math.log10(ticks[0]), math.log10(ticks[-1])
    width = PANEL - 70

    def xpos(v):
        return x0 + 35 + (math.log10(v) - lo) / max(hi - lo, 1e-9) * width

    draw.text((x0, y0 - 2 * ROW), title, fill=INK, font=font)
    bottom = y0 + len(values) * ROW
    for t in ticks:
        draw.line([(xpos(t), y0 - 4), (xpos(t), bottom)], fill=GRID)
        draw.text((xpos(t), bottom + 4), f"{t:g}", fill=INK, font=font, anchor="ma")
    one = xpos(1.0)
    for i, v in enumerate(values):
        y = y0 + i * ROW
        if v is None or v <= 0:
            draw.text((one + 4, y + ROW // 2), "-", fill=INK, font=font, anchor="lm")
            continue
        end = xpos(v)
        draw.rectangle([min(one, end), y + 4, max(max(one, end), min(one, end) + 1), y + ROW - 4], fill=colors[i])
        label = f"{v:.2f}x"
        if v >= 1:
            draw.text((end + 4, y + ROW // 2), label, fill=INK, font=font, anchor="lm")
        else:
            draw.text((end - 4, y + ROW // 2), label, fill=INK, font=font, anchor="rm")
    draw.line([(one, y0 - 4), (one, bottom)], fill=INK, width=2)


def _panel(draw, font, x0, y0, rows, values, title, fmt, colors):
    """Horizontal bars of ``values`` (None: no bar, '-') in a PANEL-wide column at (x0, y0)."""
    known = [v for v in values if v is not None]
    ticks = _ticks(max(known + [1e-9]))
    scale = (PANEL - 70) / ticks[-1]  # room for the value written after the longest bar
    draw.text((x0, y0 - 2 * ROW), title, fill=INK, font=font)
    bottom = y0 + len(rows) * ROW
    for t in ticks:
        x = x0 + t * scale
        draw.line([(x, y0 - 4), (x, bottom)], fill=GRID)
        draw.text((x, bottom + 4), f"{t:g}", fill=INK, font=font, anchor="ma")
    for i, v in enumerate(values):
        y = y0 + i * ROW
        if v is None:
            draw.text((x0 + 4, y + ROW // 2), "-", fill=INK, font=font, anchor="lm")
            continue
        draw.rectangle([x0, y + 4, x0 + max(v * scale, 1), y + ROW - 4], fill=colors[i])
        draw.text((x0 + v * scale + 4, y + ROW // 2), fmt(v), fill=INK, font=font, anchor="lm")
    draw.line([(x0, y0 - 4), (x0, bottom)], fill=INK)


# the parts of a step, in colours none of the implementations' bars use
SPLIT_COLORS = {"kernels": (23, 190, 207), "compiled kernels": (23, 190, 207), "kernels' Python host code": (188, 189, 34),
                "outside kernels": (227, 26, 28)}


def _step_parts(p):
    """[(part, seconds)] of one step (``train.kernel_time_split``): compiled code, the kernel functions'
    host code and the rest (graph walk, Function.apply, checks) where the backend has compiled code;
    else kernel functions and the rest; for a captured step, its compiled calls and the rest."""
    if "replays" in p:  # a captured step (train.captured_time_split): its compiled calls and the rest
        return [("compiled kernels", p["compiled_s"]), ("outside kernels", p["outside_s"])]
    if "compiled_s" in p:
        return [("compiled kernels", p["compiled_s"]), ("kernels' Python host code", p["host_s"]), ("outside kernels", p["outside_s"])]
    return [("kernels", p["kernel_s"]), ("outside kernels", p["outside_s"])]


def _split_bars(draw, font, x0, y0, label_w, width, splits):
    """One stacked bar per implementation: where its step's time goes, in % of the step."""
    draw.text((x0, y0 + ROW // 2), "where a training step's time goes (% of the step; ms)", fill=INK, font=font, anchor="lm")
    for i, (name, parts) in enumerate(splits):
        y = y0 + (i + 1) * ROW
        draw.text((x0, y + ROW // 2), f"step [{name}]", fill=INK, font=font, anchor="lm")
        total = sum(seconds for _, seconds in parts) or 1.0
        x = x0 + label_w
        for part, seconds in parts:
            w = width * seconds / total
            draw.rectangle([x, y + 4, x + w, y + ROW - 4], fill=SPLIT_COLORS[part])
            if w > 60:
                draw.text((x + 4, y + ROW // 2), f"{100 * seconds / total:.0f}% {seconds * 1e3:.1f}", fill="white", font=font, anchor="lm")
            x += w
    names = list(dict.fromkeys(part for _, parts in splits for part, _ in parts))  # every part, in order, once
    legend = "   ".join(names)
    draw.text((x0 + label_w, y0 + (len(splits) + 1) * ROW + ROW // 2), "colours: " + legend, fill=INK, font=font, anchor="lm")
    x = x0 + label_w + draw.textlength("colours: ", font=font)
    for part in names:  # a swatch under each name
        w = draw.textlength(part, font=font)
        draw.rectangle([x, y0 + (len(splits) + 2) * ROW - 5, x + w, y0 + (len(splits) + 2) * ROW - 2], fill=SPLIT_COLORS[part])
        x += w + draw.textlength("   ", font=font)


def draw(entries, limits, path, title, profile=None):
    """Write the two charts of ``entries`` (``timing.measure`` results) to ``path`` (PNG)."""
    font, big = _font(14), _font(18)
    rows = _rows(entries)
    notes = []
    if limits:
        notes.append(f"FP32 peak {limits['fp32_peak']['gflops']:.1f} GFLOP/s ({limits['fp32_peak']['basis']})")
        notes.append(f"bandwidth {limits['bandwidth']['gbytes_per_s']:.1f} GB/s ({limits['bandwidth']['basis']})")
    for name, p in (profile or {}).items():
        line = f"{name}: peak RSS of training " + ("n/a" if p.get("peak_rss_mib") is None else
                                                  f"{p['peak_rss_mib']:.0f} MiB (+{p['step_mib']:.0f} over the built model)")
        if "outside_pct" in p:
            line += f"; {p['outside_net_pct']:.1f}% of the step outside backend kernels (timing wrappers' cost taken off)"
        notes.append(line)
    splits = [(name, _step_parts(p)) for name, p in (profile or {}).items() if "outside_s" in p]

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{case} [{impl}]" for case, impl, *_ in rows]
    label_w = int(max([probe.textlength(t, font=font) for t in labels] + [100])) + PAD
    notes_w = int(max([probe.textlength(t, font=font) for t in notes] + [0]))
    width = max(PAD + label_w + 2 * (PANEL + PAD) + UNIT + PAD, notes_w + 2 * PAD)
    top = PAD + 2 * ROW + 2 * ROW  # title, panel titles
    split_h = (2 + len(splits)) * ROW if splits else 0
    height = top + len(rows) * ROW + 2 * ROW + split_h + len(notes) * ROW + PAD
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), title, fill=INK, font=big)

    impl_colors = {}
    colors = []
    for _, impl, *_ in rows:
        if impl == "torch":
            colors.append(TORCH_COLOR)
        else:
            colors.append(impl_colors.setdefault(impl, COLORS[len(impl_colors) % len(COLORS)]))
    previous = None
    for i, (case, *_) in enumerate(rows):
        y = top + i * ROW
        if case != previous and i:
            d.line([(PAD, y), (width - PAD, y)], fill=GRID)
        previous = case
        d.text((PAD, y + ROW // 2), labels[i], fill=INK, font=font, anchor="lm")
    x_ratio = PAD + label_w
    _ratio_panel(d, font, x_ratio, top, [r[2] for r in rows],
                 "time / torch's time, log scale (line: torch = 1; left of it is faster)", colors)
    _panel(d, font, x_ratio + PANEL + PAD, top, rows, [r[3] for r in rows],
           "% of the measured FP32 peak, copy bandwidth or roofline bound (which: at right)", lambda v: f"{v:.1f}%", colors)
    for i, r in enumerate(rows):  # which limit each percentage is of
        if r[3] is not None:
            d.text((width - PAD, top + i * ROW + ROW // 2), r[4], fill=INK, font=font, anchor="rm")
    y = top + len(rows) * ROW + 2 * ROW
    if splits:
        _split_bars(d, font, PAD, y, label_w, 2 * PANEL + PAD, splits)
        y += split_h
    for note in notes:
        d.text((PAD, y), note, fill=INK, font=font)
        y += ROW
    img.save(path)
    return path
