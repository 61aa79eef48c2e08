"""The ``cpu`` attention backend: the paged backend with decode attention done by a C++ kernel that reads keys and
values in place through the block tables (``kvtier/kernels/csrc/paged_decode.cpp``), instead of gathering every KV head's blocks
into new tensors and running a matmul per head; the model it serves gets its linear weights packed for oneDNN
(``kvtier.models.packed_linear``) and its RMSNorms, SiLU-and-mul and rotary embeddings as fused kernels
(``kvtier.models.fused_ops``). The reference backend keeps all of them as transformers computes them.

What the kernel does not serve goes to the reference path, call by call, with the same result: a KV method's decode
hooks (they choose blocks or read the probabilities), a caller asking for the probabilities, dtypes other than fp32,
a cache off the CPU. Prefill attention is the reference backend's (SDPA's flash kernel per chunk).
"""

from __future__ import annotations

import torch

from kvtier.attention.metadata import DecodeGroup, DecodeHooks
from kvtier.kernels.loader import load_kernels
from kvtier.attention.paged import PagedAttentionBackend
from kvtier.cache.layer_cache import LayerCache
from kvtier.models.fused_ops import fuse_elementwise
from kvtier.models.packed_linear import pack_linears


class CpuPagedBackend(PagedAttentionBackend):
    name = "cpu"
    decode_groups_by_length = False  # the kernel reads only each row's own keys: one call for every decode

    def __init__(self) -> None:
        kernels, why = load_kernels()
        if kernels is None:
            raise RuntimeError(f"the C++ kernels did not build: {why}")
        self.kernels = kernels

    def prepare(self, model: torch.nn.Module, max_batch: int) -> None:
        pack_linears(model, max_batch)
        fuse_elementwise(model, self.kernels)

    def decode(self, q: torch.Tensor, cache: LayerCache, group: DecodeGroup, scale: float, probs_out: list[torch.Tensor] | None = None,
               hooks: DecodeHooks | None = None) -> torch.Tensor:
        k, v = cache.k, cache.v
        if (probs_out is not None or hooks is not None or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32
                or q.device.type != "cpu" or v.device.type != "cpu" or not (k.is_contiguous() and v.is_contiguous())):
            return super().decode(q, cache, group, scale, probs_out, hooks)
        starts = group.key_starts if group.key_starts is not None else torch.zeros(group.size, dtype=torch.long)
        return self.kernels.paged_decode(q, k, v, group.block_ids.view(group.size, -1), group.context_lens, starts, group.block_size,
                                         group.window or 0, scale)

