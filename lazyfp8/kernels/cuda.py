"""Reading into a CUDA destination: FP8 bytes cross PCIe, dequantization runs on the GPU.

A blocking ``param_cuda.copy_(fp8_cpu)`` converts on the CPU and sends the wide dtype; here the
stored bytes (half of bf16's for FP8) go through two small pinned buffers on a side stream, so
reading chunk i+1 from the file and copying it to the device overlap the dequantization of chunk i
on the compute stream, which writes straight into the destination. Host memory: the two pinned
buffers. Device memory besides the destination: two chunks of codes plus the kernel's workspace.
"""

from __future__ import annotations

from typing import Any

import torch

from .dequant import Workspace
from .plan import Plan

__all__ = ["read_into_cuda"]


def read_into_cuda(source: Any, dst: torch.Tensor, plan: Plan) -> None:
    """Fill contiguous CUDA tensor ``dst`` (the box ``plan`` covers) with ``source``'s values,
    bit-exact to the CPU path. ``source`` is a ``_source.TensorSource`` (its ``entry``, ``shard``,
    ``dtype``, ``kernel(device)`` and ``read_rect``), passed down by it."""
    e = source.entry
    device = dst.device
    flat = dst.view(-1)
    n = plan.largest
    kernel = source.kernel(device)
    raw_dtype = torch.uint8 if kernel is not None else e.dtype.torch
    direct = dst.dtype == source.dtype
    # Pass-through data of the destination's dtype is copied straight into it; anything else
    # lands in a device buffer first (codes to dequantize, or values to convert).
    via_buffer = kernel is not None or not direct
    work = Workspace(device)
    pinned = [torch.empty(n, dtype=raw_dtype, pin_memory=True) for _ in range(2)]
    on_device = [torch.empty(n, dtype=raw_dtype, device=device) for _ in range(2)] if via_buffer else None
    copy_stream = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)
    copied = [torch.cuda.Event() for _ in range(2)]
    consumed = [torch.cuda.Event() for _ in range(2)]
    used = [False, False]
    # The device buffers come from the caching allocator, which may hand out memory that kernels
    # still queued on the compute stream (an earlier read's dequantization) are reading: the
    # side stream must not write before that work is done.
    copy_stream.wait_stream(compute)
    for start, stop in plan.spans:
        source.shard.will_need(start, stop - start)
    with torch.cuda.device(device):
        for i, rect in enumerate(plan.chunks):
            j = i % 2
            m = rect.numel
            if used[j]:
                copied[j].synchronize()  # the pinned buffer's previous copy has left the host
            source.read_rect(pinned[j][:m], rect)
            with torch.cuda.stream(copy_stream):
                if used[j] and via_buffer:
                    copy_stream.wait_event(consumed[j])  # the device buffer is free again
                target = on_device[j][:m] if on_device is not None else flat[rect.local : rect.local + m]
                target.copy_(pinned[j][:m], non_blocking=True)
                copied[j].record(copy_stream)
            used[j] = True
            if on_device is None:
                continue
            compute.wait_event(copied[j])
            dest = flat[rect.local : rect.local + m]
            if kernel is not None:
                out = dest if direct else work.staging(m, source.dtype)
                kernel(on_device[j][:m], out, rect, work)
                if not direct:
                    dest.copy_(out)
            else:
                dest.copy_(on_device[j][:m])
            consumed[j].record(compute)
        # Copies straight into the destination ran on the side stream: order them before any
        # later use of dst on the compute stream. The pinned buffers must outlive their copies.
        compute.wait_stream(copy_stream)
    for ev, was_used in zip(copied, used):
        if was_used:
            ev.synchronize()
