"""Offload training state to host memory while vLLM generates (GPU), and bring it back for training.

HybridFlow's colocated design keeps actor, critic and reference on the same GPUs as the rollout
engine; the peak is the train→rollout switch (a common OOM in peers). During generation the
training parameters, gradients and optimizer states are not used, so they can wait in pinned host
memory: `offload()` copies them out and frees the GPU storage, `reload()` copies them back into the
same tensors (same storage sizes, so megatron-core's DDP buffer views and optimizer references stay
valid). On CPU there is nothing to free: both are no-ops.

Mechanism: each tensor keeps its Python identity; only `.data` (the storage) moves. Megatron-core's
DDP keeps params and grads as views into contiguous buffers (`param_data`, `grad_data` of each
`_ParamAndGradBuffer`): those buffers move as a whole and the views are re-pointed afterwards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from hybridflow_mg.utils.optim import torch_optimizers

log = logging.getLogger(__name__)


@dataclass
class OffloadSpec:
    """What to move out during generation."""

    params: bool = True
    grads: bool = True
    optimizer: bool = True


@dataclass
class TrainingStateOffloader:
    """Moves the GPU storage of model chunks (DDP-wrapped or not) and an optimizer to host and back."""

    chunks: list[torch.nn.Module]
    optimizer: object | None = None
    spec: OffloadSpec = field(default_factory=OffloadSpec)
    _saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def _tensors(self) -> list[torch.Tensor]:
        """The CUDA tensors to move, one per storage: a tensor whose storage is already listed (a DDP
        param view into its buffer, say) is covered by it; a view into a larger storage that nothing
        here owns is left alone (resizing that storage would cut the rest of it)."""
        out: list[torch.Tensor] = []
        seen: set[int] = set()

        def add(t: torch.Tensor | None) -> None:
            if t is None or not t.is_cuda:
                return
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                return
            seen.add(storage.data_ptr())
            out.append(t)

        for chunk in self.chunks:
            buffers = getattr(chunk, "buffers", None)  # megatron-core DDP: contiguous param/grad buffers
            if isinstance(buffers, list) and buffers and hasattr(buffers[0], "grad_data"):
                for buf in buffers:
                    if self.spec.params and getattr(buf, "param_data", None) is not None:
                        add(buf.param_data)
                    if self.spec.grads:
                        add(buf.grad_data)
            else:
                for p in chunk.parameters():
                    if self.spec.params:
                        add(p.data)
                    if self.spec.grads:
                        add(p.grad)
        if self.spec.optimizer and self.optimizer is not None:
            for inner in torch_optimizers(self.optimizer):
                for state in inner.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            add(value)
                # the mixed-precision optimizer's fp32 master weights (4 bytes per parameter; with bf16
                # params these are the optimizer's own tensors, not the model's)
                for group in inner.param_groups:
                    for p in group["params"]:
                        add(p.data)
        return out

    @torch.no_grad()
    def offload(self) -> int:
        """Copy to pinned host memory and release the GPU storage; returns the bytes moved."""
        if not torch.cuda.is_available() or self._saved:
            return 0
        moved = 0
        for t in self._tensors():
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._saved.append((t, host))
            moved += t.numel() * t.element_size()
        torch.cuda.synchronize()
        for t, _ in self._saved:
            t.untyped_storage().resize_(0)  # views into the buffer keep their offsets; no memory behind
        torch.cuda.empty_cache()
        log.debug("offloaded %.2f GiB of training state", moved / 2**30)
        return moved

    @torch.no_grad()
    def reload(self) -> int:
        """Re-allocate the GPU storage (same size, so views stay valid) and copy the state back."""
        moved = 0
        for t, host in self._saved:
            t.untyped_storage().resize_(host.numel() * host.element_size())
            t.copy_(host, non_blocking=True)
            moved += host.numel() * host.element_size()
        if self._saved:
            torch.cuda.synchronize()
        self._saved.clear()
        return moved

