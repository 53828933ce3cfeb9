"""Weights that wait on the CPU and visit the GPU: for cards smaller than the model.

Two tools, both built on one fact: inference never changes a weight. So a module can keep one copy of its weights in
pinned (page-locked) CPU memory for good; sending it to the GPU is one DMA per tensor at full PCIe speed, and
sending it back costs nothing (the GPU copies are dropped, nothing is copied back).

- `Parked`: a whole module visits the GPU for its stage (the text encoders for the prompt, the MMDiT for the
  denoising loop in low-VRAM mode).
- `BlockStreamer`: the MMDiT's joint blocks visit the GPU one at a time *during* the forward pass. Everything outside
  the blocks (embedders, positional table, final layer: ~3% of SD3.5 Large) stays on the GPU; block i+1 (and more,
  `ahead`) is copied on a side CUDA stream while block i computes, and block i's GPU copy is dropped as soon as it
  is done. The GPU then holds the non-block weights, `ahead` + 1 blocks (SD3.5 Large in FP8: ~0.2 GB each) and the
  activations, instead of the whole model. Copy and compute overlap, so the step costs max(compute, PCIe copy of
  all blocks) rather than their sum.

Memory order across streams: a block's tensors are allocated by the copy stream and read by the compute stream, so
compute waits on the copy's event, and each tensor is `record_stream`-ed on the compute stream: the caching
allocator then does not hand its memory to the next copy until the compute that reads it has finished.
"""

from __future__ import annotations

import torch
from torch import nn


def _put(store: dict, name: str, t: torch.Tensor) -> None:
    """store[name] = t, as a new Parameter where a Parameter was (.data cannot change the device type)."""
    store[name] = nn.Parameter(t, requires_grad=False) if isinstance(store[name], nn.Parameter) else t


class Parked:
    """A module whose weights wait on the CPU and visit the GPU for their stage only.

    Inference never changes a weight, so leaving the GPU costs nothing: the GPU copies are dropped and the module
    points back at its CPU copies; no device-to-host copy. The CPU copies are pinned (page-locked) when the target
    is CUDA, so coming in is one DMA per tensor at full PCIe speed; `module.to()` from pageable memory goes through a
    staging buffer at a fraction of it (on the H100 we measured the T5-XXL round trip at seconds per image). If the
    OS refuses to pin that much memory, the copies stay pageable (slower, same result)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.slots: list[tuple[dict, str, torch.Tensor]] = []  # (a module's _parameters or _buffers, name, CPU copy)
        pin = device.type == "cuda"
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is None:
                        continue
                    host = t.detach().to("cpu")
                    if pin:
                        try:
                            host = host.pin_memory()
                        except RuntimeError:
                            pin = False
                    self.slots.append((store, name, host))
        self.pinned = pin
        self.off()

    def _point(self, make) -> None:
        for store, name, host in self.slots:
            _put(store, name, make(host))

    def on(self) -> None:
        self._point(lambda h: h.to(self.device, non_blocking=self.pinned))

    def off(self) -> None:
        self._point(lambda h: h)


class BlockStreamer:
    """Streams `model.joint_blocks` to `device` during the forward pass; the rest of the model lives there.

    The fused forward (fast.FastMMDiT) calls `enter(i, skip)` before joint block i and `leave(i)` after it; `skip`
    lists the blocks that will not run this pass (skip-layer guidance), which are then not prefetched."""

    def __init__(self, model: nn.Module, device: torch.device, ahead: int = 1):
        self.device, self.ahead = device, ahead
        blocks = model.joint_blocks
        in_blocks = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
        for m in model.modules():  # everything that is not inside a joint block goes to the device for good
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and id(t) not in in_blocks:
                        _put(store, name, t.detach().to(device))
        self.parked = [Parked(b, device) for b in blocks]
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # blocks on the device (or on their way): copy event
        self.max_resident = 0  # most blocks on the device at once (tests and the benchmark read it)

    def _fetch(self, i: int) -> None:
        if i in self.ready:
            return
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.parked[i].on()
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
        else:
            self.parked[i].on()
            ev = None
        self.ready[i] = ev
        self.max_resident = max(self.max_resident, len(self.ready))

    def enter(self, i: int, skip=()) -> None:
        self._fetch(i)
        ev = self.ready[i]
        if ev is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ev)
            for store, name, _ in self.parked[i].slots:
                store[name].record_stream(main)
        n, j, queued = len(self.parked), i + 1, 0
        while j < n and queued < self.ahead:
            if j not in skip:
                self._fetch(j)
                queued += 1
            j += 1

    def leave(self, i: int) -> None:
        self.parked[i].off()
        self.ready.pop(i, None)
