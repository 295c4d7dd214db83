"""Reading into a CUDA destination: FP8 bytes cross PCIe, dequantization runs on the GPU.

A blocking ``param_cuda.copy_(fp8_cpu)`` converts on the CPU and sends the wide dtype; here the
stored bytes (half of bf16's for FP8) go through two small pinned buffers on a side stream, so
reading chunk i+1 from the file and copying it to the device overlap the dequantization of chunk i
on the compute stream, which writes straight into the destination. Host memory: the two pinned
buffers. Device memory besides the destination: two chunks of codes plus the kernel's workspace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._source import TensorSource

__all__ = ["read_into_cuda"]


def read_into_cuda(source: "TensorSource", dst: torch.Tensor) -> None:
    """Fill contiguous CUDA tensor ``dst`` with ``source``'s values (bit-exact to the CPU path)."""
    from ._dequant import Workspace

    e = source.entry
    device = dst.device
    flat = dst.view(-1)
    plan = source.plan()
    n = plan.largest
    isz = e.dtype.itemsize
    kernel = source.kernel(device)
    raw_dtype = torch.uint8 if kernel is not None else e.dtype.torch
    direct = dst.dtype == source.dtype
    work = Workspace(device)
    pinned = [torch.empty(n, dtype=raw_dtype, pin_memory=True) for _ in range(2)]
    on_device = [torch.empty(n, dtype=raw_dtype, device=device) for _ in range(2)] if (kernel is not None or not direct) else None
    copy_stream = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)
    copied = [torch.cuda.Event() for _ in range(2)]
    consumed = [torch.cuda.Event() for _ in range(2)]
    used = [False, False]
    source.shard.will_need(e.offset, e.nbytes)
    with torch.cuda.device(device):
        for i, (a, b, rows, c0) in enumerate(plan.chunks):
            j = i % 2
            m = b - a
            if used[j]:
                copied[j].synchronize()  # the pinned buffer's previous copy has left the host
            source.shard.read_into(pinned[j][:m], e.offset + a * (1 if kernel is not None else isz), e.name)
            with torch.cuda.stream(copy_stream):
                if used[j]:
                    copy_stream.wait_event(consumed[j])  # the device buffer is free again
                target = flat[a:b] if on_device is None else on_device[j][:m]
                target.copy_(pinned[j][:m], non_blocking=True)
                copied[j].record(copy_stream)
            used[j] = True
            compute.wait_event(copied[j])
            if on_device is not None:
                if kernel is not None:
                    out = flat[a:b] if direct else work.get(m, source.dtype)
                    kernel(on_device[j][:m], out, rows, c0, work)
                else:
                    out = on_device[j][:m]
                if not direct:
                    flat[a:b].copy_(out)
                consumed[j].record(compute)
    # The pinned buffers must outlive their copies; the caller may use dst on the compute stream.
    for ev in copied:
        ev.synchronize()
