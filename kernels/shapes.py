"""Output sizes of the windowed ops: the one home of each formula.

``minseg/functional.py`` uses them to validate arguments and every backend of
``conv2d``, ``max_pool2d`` and ``avg_pool2d`` uses them to size its output, so
a formula fixed here is fixed everywhere. All sizes are along one axis.

A window op slides a kernel of ``k`` taps, ``d`` apart (dilation), in steps of
``s`` over an input of ``size`` samples padded with ``p_before`` / ``p_after``.
The kernel spans ``d*(k - 1) + 1`` samples, so it fits at
``size + p_before + p_after - d*(k - 1)`` positions; every ``s``-th one is an
output::

    out = floor((size + p_before + p_after - d*(k - 1) - 1) / s) + 1
"""
from __future__ import annotations


def conv_output_size(size: int, pad_total: int, dilation: int, kernel: int, stride: int) -> int:
    """Length of a conv2d output axis (torch.nn.Conv2d's formula); pad_total = before + after."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, padding: int, dilation: int, kernel: int, stride: int, output_padding: int) -> int:
    """Length of a conv_transpose2d output axis: the conv2d input length that gives ``size``.

    Solving the conv formula for the input: ``(size - 1)*s - 2p + d*(k - 1) + 1``; several input
    lengths map to the same output when s > 1, and ``output_padding`` (< s or d) picks a longer one.
    """
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    """Length of a max_pool2d / avg_pool2d output axis (padding on both sides), torch's rule.

    ``ceil_mode`` rounds the number of steps up, so a last, partial window covers the
    remainder; that window must still start inside the input or the left padding,
    otherwise it would read padding only and is dropped.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out
