"""Turns a ``SchedulerOutput`` into tensors, runs the model once, and returns only the logits needed.

It knows the model, the KV storage and the attention backend, and nothing of the scheduler or the
cache managers: every step arrives as plain data. Attention groups get their metadata from the
backend; a hybrid's Mamba2 state groups get the slots of the same token layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.metadata import AttentionMetadata, DecodeHooks, ScheduledTokens
from kvtier.cache.kv_storage import KVStorage
from kvtier.cache.specs import KVCacheSpec, MambaSpec
from kvtier.engine.scheduler_output import SchedulerOutput
from kvtier.ssm.metadata import plan_states


@dataclass
class StepLogits:
    last: dict[int, torch.Tensor]  # seq_id -> [V] logits after the chunk's last token (sampled seqs only)
    prompt: dict[int, torch.Tensor]  # seq_id -> [num_tokens, V] logits at every chunk position (prompt_logprobs)
    # seq_id -> [layers, heads, context] the decode query's attention probabilities by cache slot (the key's position unless a KV
    # method evicted tokens; 0 where it sees none);
    # only when asked for (``execute(..., decode_probs=True)``)
    decode_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    # seq_id -> per attention layer the queries (after RoPE) of the rows its ``SchedulerOutput.query_rows`` asked for
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # the step's logits as one tensor, and the row of each sampled seq's ``last`` in it: the sampler reads a batch
    # straight from it instead of stacking the rows again
    table: torch.Tensor | None = None
    last_row: dict[int, int] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: nn.Module, storage: KVStorage, specs: list[KVCacheSpec], device: torch.device, backend: AttentionBackend,
                 decode_hooks: DecodeHooks | None = None) -> None:
        """``specs``: each layer group's cache spec, in the storage's group order. ``decode_hooks``: the engine's KV method,
        when it acts inside decode attention."""
        self.model = model
        self.backend = backend
        self.decode_hooks = decode_hooks
        self.storage = storage
        self.specs = specs
        self.state_groups = [g for g, spec in enumerate(specs) if isinstance(spec, MambaSpec)]
        self.attention_groups = [g for g in range(len(specs)) if g not in self.state_groups]
        self.device = device
        self.block_size = storage.block_size
        self.kv_caches = storage.layer_caches()
        self.layer_groups = storage.layer_groups()

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, decode_probs: bool = False) -> StepLogits:
        """Do the step's block moves, then the forward; an empty step only moves blocks. ``decode_probs``: also return
        every decode query's attention probabilities (what a KV method that scores keys reads). The queries of
        ``step.query_rows`` come back layer by layer (a method that reads the prompt's last queries)."""
        self.storage.apply(step.ops)
        if not step.seqs:
            return StepLogits({}, {})
        windows = {g: self.specs[g].sliding_window for g in self.attention_groups}
        ordered, attention = self.backend.plan(list(step.seqs), self.block_size, windows, self.device)
        for g, meta in zip(self.attention_groups, attention):
            meta.kv_method = self.decode_hooks if getattr(self.specs[g], "kv_method", False) else None
            if decode_probs:
                meta.decode_probs = []
        asked = self._ask_queries(ordered, attention, step.query_rows) if step.query_rows else []
        group_metas = dict(zip(self.attention_groups, attention))
        group_metas.update({g: plan_states(ordered, g, self.device) for g in self.state_groups})
        ids = [t for s in ordered for t in s.token_ids]
        positions = [p for s in ordered for p in range(s.start, s.start + s.num_tokens)]
        metas = [group_metas[g] for g in self.layer_groups]
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), self.kv_caches, metas)
        result = self._logits(ordered, hidden, step.sample_ids, step.prompt_logit_ids)
        if decode_probs:
            result.decode_probs = self._decode_probs(ordered, group_metas)
        if asked:
            result.queries = self._queries(asked, group_metas)
        return result

    def _ask_queries(self, ordered: list[ScheduledTokens], attention: list[AttentionMetadata],
                     query_rows: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
        """Point every attention group at the batch rows of ``query_rows``; returns (seq_id, count) in row order."""
        rows: list[int] = []
        asked: list[tuple[int, int]] = []
        offset = 0
        for s in ordered:
            if s.seq_id in query_rows:
                first, count = query_rows[s.seq_id]
                rows.extend(range(offset + first, offset + first + count))
                asked.append((s.seq_id, count))
            offset += s.num_tokens
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for meta in attention:
            meta.query_rows, meta.queries = index, []
        return asked

    def _queries(self, asked: list[tuple[int, int]], group_metas: dict[int, AttentionMetadata]) -> dict[int, list[torch.Tensor]]:
        calls = {g: iter(group_metas[g].queries) for g in self.attention_groups}  # a group's layers appended in layer order
        out: dict[int, list[torch.Tensor]] = {sid: [] for sid, _ in asked}
        for g in self.layer_groups:
            if g in calls:
                for (sid, _), rows in zip(asked, next(calls[g]).split([n for _, n in asked])):
                    out[sid].append(rows)
        return out

    def _decode_probs(self, ordered: list[ScheduledTokens], group_metas: dict[int, AttentionMetadata]) -> dict[int, torch.Tensor]:
        """Each decode sequence's probabilities, attention layer by layer, scattered from gathered keys to key positions."""
        calls = {g: iter(group_metas[g].decode_probs) for g in self.attention_groups}  # a group's layers appended in layer order
        out: dict[int, torch.Tensor] = {}
        for layer, g in enumerate(self.layer_groups):
            if g not in calls:
                continue
            for dg, probs in zip(group_metas[g].decode_groups, next(calls[g])):
                positions = dg.key_positions()
                for i in range(dg.size):
                    seq = ordered[dg.start + i]
                    dense = out.get(seq.seq_id)
                    if dense is None:
                        dense = out[seq.seq_id] = probs.new_zeros(len(self.layer_groups), probs.shape[1], seq.slot_start + 1)
                    seen = positions[i] <= seq.slot_start
                    dense[layer][:, positions[i][seen]] = probs[i][:, seen]
        return out

    def _logits(self, ordered: list[ScheduledTokens], hidden: torch.Tensor, sample_ids: frozenset[int], prompt_logit_ids: frozenset[int]) -> StepLogits:
        rows: list[int] = []
        owners: list[tuple[int, bool, int]] = []  # (seq_id, is_prompt_block, length)
        offset = 0
        for c in ordered:
            sid = c.seq_id
            if sid in prompt_logit_ids:
                rows.extend(range(offset, offset + c.num_tokens))
                owners.append((sid, True, c.num_tokens))
            elif sid in sample_ids:
                rows.append(offset + c.num_tokens - 1)
                owners.append((sid, False, 1))
            offset += c.num_tokens
        result = StepLogits({}, {})
        if not rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
        result.table = logits
        i = 0
        for sid, is_prompt, n in owners:
            block = logits[i : i + n]
            if is_prompt:
                result.prompt[sid] = block
            if sid in sample_ids:
                result.last[sid] = block[-1]
                result.last_row[sid] = i + n - 1
            i += n
        return result
