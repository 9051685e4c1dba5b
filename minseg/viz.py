"""Pictures: coloured masks (Pascal VOC palette), overlays, boxes, image grids, training
curves, and the autograd graph.

Everything is drawn with Pillow; no plotting library is needed. Images come
in as float (3, H, W) arrays in [0, 1] (minseg's layout) or uint8 (H, W, 3).
The autograd graph (:func:`graph`) is Graphviz DOT text, rendered to PNG by
Graphviz's ``dot`` program when it is installed (:func:`render_graph`).
"""
from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map, (n, 3) uint8: class 0 black, 1 dark red, 2 green, 3 olive, ...

    The bits of the class id are spread over the colour channels, highest
    bits first: bit 3k of the id sets bit (7 - k) of red, bit 3k+1 green, 3k+2 blue.
    """
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.int64)
    for k in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * k + channel)) & 1) << (7 - k)
    return colours.astype(np.uint8)


PALETTE = voc_palette()


def to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from float (3, H, W) in [0, 1] or an (H, W, 3) uint8 array."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def mask_image(mask):
    """An indexed ('P') PIL image whose pixel values are the class ids, with the VOC palette."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("mask values must be in [0, 255] to be stored as an indexed PNG")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE.reshape(-1).tolist())
    return im


def colorize(mask) -> np.ndarray:
    """(H, W, 3) uint8 colours of a class mask."""
    return PALETTE[np.asarray(mask).astype(np.int64) % 256]


def overlay(image, mask, alpha: float = 0.5, ignore_index: int | None = 255, background: int | None = 0) -> np.ndarray:
    """The image with the mask colours blended in (``alpha`` = mask weight).

    Pixels of the ``background`` class (black in the VOC palette, which would
    only darken the picture) and ignored pixels are left as they are.
    """
    mask = np.asarray(mask)
    base = to_uint8(image).astype(np.float32)
    blend = (1 - alpha) * base + alpha * colorize(mask).astype(np.float32)
    for untouched in (ignore_index, background):
        if untouched is not None:
            blend[mask == untouched] = base[mask == untouched]
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def draw_boxes(image, boxes, labels, width: int = 1) -> np.ndarray:
    """Rectangles (``[x0, y0, x1, y1]`` inclusive, as ``masks_to_boxes``) in their class colour."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(to_uint8(image).copy())
    draw = ImageDraw.Draw(im)
    for (x0, y0, x1, y1), c in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
        colour = tuple(int(v) for v in PALETTE[c]) if c else (255, 255, 255)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    return np.asarray(im)


def save_png(path, array) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(array)).save(path)


def grid(rows, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Tile a list of rows (each a list of (H, W, 3) uint8 images of one size) into one picture."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = im
    return out.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else out


def prediction_grid(images, truths, preds, scale: int = 2, classes=None, titles=("image", "truth", "prediction")) -> np.ndarray:
    """One row per sample: image | ground truth | prediction (ignored truth pixels shown white).

    Column ``titles`` go above the columns (``None``: no header); with ``classes``
    (names, in class-id order) a legend of the class colours goes below.
    """
    rows = []
    for image, truth, pred in zip(images, truths, preds):
        truth_rgb = colorize(truth)
        truth_rgb[np.asarray(truth) == 255] = 255
        rows.append([to_uint8(image), truth_rgb, colorize(pred)])
    picture = grid(rows, scale=scale)
    if titles is not None:
        picture = column_titles(picture, titles, column_width=rows[0][0].shape[1] * scale, gap=2 * scale)
    if classes is not None:
        picture = np.concatenate([picture, legend(classes, width=picture.shape[1])], axis=0)
    return picture


def column_titles(picture, titles, column_width: int, gap: int) -> np.ndarray:
    """``picture`` with a white header holding one centred title per column."""
    from PIL import Image, ImageDraw

    header = Image.new("RGB", (picture.shape[1], TEXT_HEIGHT + 6), "white")
    draw = ImageDraw.Draw(header)
    for j, title in enumerate(titles):
        x0, _, x1, _ = draw.textbbox((0, 0), title)
        left = j * (column_width + gap) + max(0, (column_width - (x1 - x0)) // 2)
        draw.text((left, 2), title, fill="black")
    return np.concatenate([np.asarray(header), picture], axis=0)


def legend(classes, width: int) -> np.ndarray:
    """A white strip, ``width`` pixels wide, with a colour swatch and the name of every class, wrapped into lines."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = []  # (x, line, class id, name)
    x, line = 4, 0
    for c, name in enumerate(classes):
        label = f"{c} {name}"
        entry = 14 + probe.textbbox((0, 0), label)[2] + 10  # swatch, space, text, space
        if x + entry > width and x > 4:
            x, line = 4, line + 1
        entries.append((x, line, c, label))
        x += entry
    strip = Image.new("RGB", (width, (line + 1) * (TEXT_HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for x, line, c, label in entries:
        y = 4 + line * (TEXT_HEIGHT + 4)
        draw.rectangle([x, y + 1, x + 10, y + 11], fill=tuple(int(v) for v in PALETTE[c]), outline=(128, 128, 128))
        draw.text((x + 14, y), label, fill="black")
    return np.asarray(strip)


TEXT_HEIGHT = 12  # Pillow's default font: 11-12 pixels from the top of a line to the bottom of its descenders


def confusion_matrix_image(matrix, classes, cell: int = 56) -> np.ndarray:
    """A picture of the row-normalised confusion matrix: row = true class, column = predicted class.

    Each cell shows the fraction of the row's pixels (rows sum to 1; a class
    with no pixels shows '-') and is shaded from white (0) to dark blue (1).
    """
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, dtype=np.float64)
    n = len(m)
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, m / rows, np.nan)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textbbox((0, 0), str(c))[2] for c in classes) + 10
    cell = max(cell, label_w)  # every column name fits over its cell
    left, top = label_w + 16, TEXT_HEIGHT * 2 + 14
    im = Image.new("RGB", (left + n * cell + 8, top + n * cell + 8), "white")
    draw = ImageDraw.Draw(im)
    draw.text((left, 2), "predicted class", fill="black")
    for j, name in enumerate(classes):  # column names, centred over the cells
        w = probe.textbbox((0, 0), str(name))[2]
        draw.text((left + j * cell + max(0, (cell - w) // 2), TEXT_HEIGHT + 6), str(name), fill="black")
    for k, ch in enumerate("true"):  # the row axis title, written downwards
        draw.text((2, top + k * TEXT_HEIGHT), ch, fill="black")
    for i, name in enumerate(classes):
        draw.text((14, top + i * cell + (cell - TEXT_HEIGHT) // 2), str(name), fill="black")
        for j in range(n):
            v = frac[i, j]
            shade = (255, 255, 255) if np.isnan(v) else tuple(int(round(255 - v * (255 - c))) for c in (8, 48, 107))
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            draw.rectangle(box, fill=shade, outline=(200, 200, 200))
            text = "-" if np.isnan(v) else f"{v:.2f}"
            w = probe.textbbox((0, 0), text)[2]
            colour = "white" if not np.isnan(v) and v > 0.5 else "black"
            draw.text((box[0] + (cell - w) // 2, box[1] + (cell - TEXT_HEIGHT) // 2), text, fill=colour)
    return np.asarray(im)


# -------------------------------------------------------------------- line plots

SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    return [start + k * step for k in range(int(math.ceil((hi - start) / step)) + 1)]


def plot_curves(path, series: dict, title: str = "", xlabel: str = "epoch", size=(480, 320)) -> None:
    """A PNG line plot of ``{name: [y per x = 1, 2, ...]}`` with axes, ticks and a legend.

    NaN values are skipped. Drawn with Pillow's ImageDraw and default font.
    """
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 56, 12, 26, 36
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    n = max((len(ys) for ys in series.values()), default=1)
    ticks = _nice_ticks(min(values, default=0.0), max(values, default=1.0))
    y_lo, y_hi = ticks[0], ticks[-1]
    x_hi = max(n, 2)

    def px(x, y):
        return (
            left + (x - 1) / (x_hi - 1) * (width - left - right),
            top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom),
        )

    for t in ticks:
        _, y = px(1, t)
        draw.line([(left, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{t:.3g}", fill="black")
    for x in sorted({1, x_hi, *range(1, x_hi + 1, max(1, x_hi // 8))}):
        xp, _ = px(x, y_lo)
        draw.line([(xp, height - bottom), (xp, height - bottom + 4)], fill="black")
        draw.text((xp - 4, height - bottom + 6), str(x), fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 3 * len(xlabel), height - 14), xlabel, fill="black")
    draw.text((left, 6), title, fill="black")
    for k, ys in enumerate(series.values()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        points = [px(i + 1, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    # the legend, in a framed box above the curves, in the top-right corner
    lx = width - right - 116
    draw.rectangle([lx - 4, top + 3, width - right - 4, top + 7 + 14 * len(series)], fill="white", outline=(160, 160, 160))
    for k, name in enumerate(series):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        ly = top + 6 + 14 * k
        draw.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=colour, width=2)
        draw.text((lx + 20, ly), name, fill="black")
    im.save(path)


# -------------------------------------------------------------- autograd graph


def _dot_string(text: str) -> str:
    """``text`` as a quoted DOT string; newlines become DOT's centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph(root, names: dict | None = None) -> str:
    """The autograd graph that ends in Tensor ``root``, as Graphviz DOT text.

    Two kinds of node, edges in the direction of the forward pass::

        input Tensor -> Function -> output Tensor

    * a Function node (box, grey) per recorded Function application, labelled
      with its class name (``Conv2dFunction``, ``Add``, ...): the ``ctx.function``
      of the Tensor it made;
    * a Tensor node (ellipse) per Tensor, labelled with its shape and dtype, then
      ``leaf`` for a Tensor no Function made (parameters, inputs) and
      ``requires_grad`` for one whose gradient backward computes. Leaves that
      require grad (what an optimizer updates) are filled blue, leaves that do
      not (images, targets) grey, the root green.

    ``names`` maps a name to a Tensor (``dict(model.named_parameters())``, or
    ``{"x": x}``) to put that name on top of the Tensor's label. Node ids are
    ``t0, t1, ...`` (Tensors) and ``f0, f1, ...`` (Functions), numbered
    breadth-first from ``root``, so the same graph gives the same text. A
    Tensor passed twice to one Function (``x * x``) has two edges to it.
    Non-Tensor arguments (``bias=None``, a stride) are not drawn.

    Render the text with :func:`render_graph`, or ``dot -Tpng graph.dot -o graph.png``.
    """
    label_of = {id(t): name for name, t in (names or {}).items()}
    tensor_ids: dict[int, str] = {}
    lines = ["digraph autograd {", '  node [fontname="Helvetica", fontsize=10];']

    def tensor_node(t) -> str:
        key = tensor_ids.get(id(t))
        if key is None:
            key = tensor_ids[id(t)] = f"t{len(tensor_ids)}"
            marks = [m for m, on in (("leaf", t.is_leaf), ("requires_grad", t.requires_grad)) if on]
            text = "\n".join(
                ([label_of[id(t)]] if id(t) in label_of else []) + [f"{tuple(t.shape)} {t.dtype}"] + ([", ".join(marks)] if marks else [])
            )
            fill = "palegreen" if t is root else "lightblue" if t.is_leaf and t.requires_grad else "lightgrey" if t.is_leaf else "white"
            lines.append(f"  {key} [label={_dot_string(text)}, shape=ellipse, style=filled, fillcolor={fill}];")
            queue.append(t)
        return key

    queue: list = []
    tensor_node(root)
    functions = 0
    while queue:
        t = queue.pop(0)
        ctx = t._ctx
        if ctx is None:
            continue
        fn = f"f{functions}"
        functions += 1
        lines.append(f"  {fn} [label={_dot_string(ctx.function.__name__)}, shape=box, style=filled, fillcolor=gainsboro];")
        lines.append(f"  {fn} -> {tensor_ids[id(t)]};")
        for inp in ctx.inputs:
            if inp is not None:
                lines.append(f"  {tensor_node(inp)} -> {fn};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_graph(dot_text: str, path, missing_ok: bool = False) -> bool:
    """Render DOT text (from :func:`graph`) to a PNG file at ``path`` with Graphviz's ``dot``.

    Returns True when the PNG was written. Without a ``dot`` program on the PATH
    this raises a RuntimeError saying how to get one -- or, with ``missing_ok``,
    returns False (the DOT text itself is still readable, and any Graphviz
    viewer shows it).
    """
    dot = shutil.which("dot")
    if dot is None:
        if missing_ok:
            return False
        raise RuntimeError(
            "render_graph needs Graphviz's 'dot' program, which is not on the PATH "
            "(install Graphviz, e.g. 'apt-get install graphviz'); the DOT text can be viewed without it"
        )
    done = subprocess.run([dot, "-Tpng", "-o", str(path)], input=dot_text, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed (exit {done.returncode}) rendering {path}: {done.stderr.strip()}")
    return True


__all__ = [
    "graph",
    "render_graph",
    "voc_palette",
    "PALETTE",
    "to_uint8",
    "mask_image",
    "colorize",
    "overlay",
    "draw_boxes",
    "save_png",
    "grid",
    "prediction_grid",
    "column_titles",
    "legend",
    "confusion_matrix_image",
    "plot_curves",
]
