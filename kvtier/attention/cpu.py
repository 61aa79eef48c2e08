"""The ``cpu`` attention backend: the paged backend with decode attention done by a C++ kernel that reads keys and
values in place through the block tables (``kvtier/kernels/csrc/paged_decode.cpp``), instead of gathering every KV head's blocks
into new tensors and running a matmul per head; the model it serves gets its linear weights packed for oneDNN
(``kvtier.models.packed_linear``) and its RMSNorms, SiLU-and-mul and rotary embeddings as fused kernels
(``kvtier.models.fused_ops``). The reference backend keeps all of them as transformers computes them.

The kernel also does KCache's read (every key scored, only the Top-N values read, the residual's block means added
where asked: a method's ``value_selection``). What
it does not serve goes to the reference path, call by call, with the same result: other KV methods' decode hooks (they
choose blocks or read the probabilities; an engine with such a method sends every decode there), a caller asking for
the probabilities, dtypes other than fp32, a cache off the CPU. Prefill attention is the reference backend's (SDPA's flash kernel per chunk).
"""

from __future__ import annotations

import torch

from kvtier.attention.metadata import DecodeGroup, DecodeHooks
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.cache.layer_cache import LayerCache
from kvtier.kernels.loader import load_kernels
from kvtier.models.fused_ops import fuse_elementwise
from kvtier.models.packed_linear import pack_linears


class CpuPagedBackend(PagedAttentionBackend):
    name = "cpu"

    def __init__(self, decode_kernel: bool = True) -> None:
        """``decode_kernel=False``: decode attention on the reference path throughout (what a KV method acting inside it
        needs, unless it is a plain ``value_selection``), the model's linears and elementwise work still native."""
        kernels, why = load_kernels()
        if kernels is None:
            raise RuntimeError(f"the C++ kernels did not build: {why}")
        self.kernels = kernels
        self.decode_kernel = decode_kernel
        # the kernel reads only each row's own keys: one call for every decode; the reference gathers whole padded tables
        self.decode_groups_by_length = not decode_kernel

    def prepare(self, model: torch.nn.Module, max_batch: int) -> None:
        pack_linears(model, max_batch)
        fuse_elementwise(model, self.kernels)

    def decode(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup, scale: float, probs_out: list[torch.Tensor] | None = None,
               hooks: DecodeHooks | None = None) -> torch.Tensor:
        k, v = cache.k, cache.v
        selection = None if hooks is None else hooks.value_selection
        if (not self.decode_kernel or probs_out is not None or (hooks is not None and (selection is None or group.window))
                or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32
                or q.device.type != "cpu" or v.device.type != "cpu" or not (k.is_contiguous() and v.is_contiguous())):
            return super().decode(q, cache, group, scale, probs_out, hooks)
        starts = group.key_starts if group.key_starts is not None else torch.zeros(group.size, dtype=torch.long)
        top_n = _ALL if selection is None else selection.counts(group.context_lens)
        per_kv_head, renormalize = (False, False) if selection is None else (selection.per_kv_head, selection.renormalize)
        sums = cache.value_sums if selection is not None and selection.residual else _NONE
        return self.kernels.paged_decode(q, k, v, group.block_ids.view(group.size, -1), group.context_lens, starts, group.block_size,
                                         group.window or 0, scale, top_n, per_kv_head, renormalize, sums)


_ALL = torch.empty(0, dtype=torch.long)  # top_n for the kernel: read every value
_NONE = torch.empty(0)  # value_sums for the kernel: no residual
