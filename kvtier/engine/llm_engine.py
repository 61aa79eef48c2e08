"""The engine loop: add requests, then ``step()``: schedule -> run the model -> sample -> emit outputs."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import torch

from kvtier.attention.registry import get_backend
from kvtier.cache.checkpoint import StateCheckpoint
from kvtier.cache.coordinator import KVCacheCoordinator
from kvtier.cache.kv_storage import KVStorage
from kvtier.cache.memory_plan import MemoryPlan, kv_budget_bytes
from kvtier.cache.specs import kv_cache_groups
from kvtier.cache.state_prefix_cache import StatePrefixCache
from kvtier.config import EngineArgs, GiB
from kvtier.engine.branching import Branching
from kvtier.engine.checkpoints import Checkpoints, check_checkpoint_args
from kvtier.engine.compression import Compression
from kvtier.engine.input_processor import EngineInput, InputProcessor, PromptInput
from kvtier.engine.model_runner import ModelRunner, StepLogits
from kvtier.engine.output_processor import OutputProcessor
from kvtier.engine.scheduler import Scheduler, StepPlan
from kvtier.engine.sequence import Request, RequestStatus, Sequence
from kvtier.errors import InvalidArgumentError, OutOfKVCacheError
from kvtier.kv_methods.base import KVMethod
from kvtier.kv_methods.registry import build_method
from kvtier.models.config import ModelConfig, parse_dtype
from kvtier.models.loader import load_model, resolve_model_path
from kvtier.models.registry import model_class
from kvtier.outputs import RequestMetrics, RequestOutput
from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import POLICIES, Policy
from kvtier.sampling.sampler import Sampler, SamplingRow, compute_logprobs
from kvtier.sampling_params import BeamSearchParams, SamplingParams
from kvtier.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        path = resolve_model_path(args.model)
        self.device = args.resolve_device()
        cfg = ModelConfig.from_pretrained(path)
        model_class(cfg.architecture)  # fail on an unsupported architecture before loading anything
        dtype = cfg.dtype if args.dtype == "auto" else parse_dtype(args.dtype)
        self.model_config = cfg = replace(cfg, dtype=dtype)
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings and (cfg.rope is None or cfg.rope.rope_type == "default"):
            raise InvalidArgumentError("max_model_len", f"must be <= max_position_embeddings ({cfg.max_position_embeddings}), got {self.max_model_len}")
        self.tokenizer = Tokenizer.from_pretrained(args.tokenizer or path)
        torch.manual_seed(args.seed)
        budget = args.max_num_batched_tokens or (2048 if args.enable_chunked_prefill else self.max_model_len)
        if not args.enable_chunked_prefill and budget < self.max_model_len:
            raise InvalidArgumentError("max_num_batched_tokens", f"must be >= max_model_len ({self.max_model_len}) without chunked prefill, got {budget}")
        method = self._kv_method()
        self.attention = get_backend(args.attention_backend, self.device, method if method is not None and method.decode_hooks else None)
        self.model = load_model(path, cfg, dtype, self.device, self.max_model_len, self.attention)
        self.attention.prepare(self.model, args.max_num_seqs)
        groups = kv_cache_groups(cfg, args.block_size, dtype, self._mamba_dtypes(dtype),
                                 None if method is None else method.cache_state(cfg.num_hidden_layers))
        swap = int(args.swap_space * GiB) if args.preemption_mode == "swap" else 0
        self.memory_plan = MemoryPlan.split(groups, kv_budget_bytes(args, cfg, self.device), swap, self.max_model_len, budget,
                                            args.mamba_full_memory_ratio, args.kv_host_memory)
        self._check_plan()
        self.prefix_cache_policy = self._prefix_cache_policy()
        self.kv = KVCacheCoordinator(self.memory_plan, budget, self.prefix_cache_policy == "hash", args.prefix_caching_hash_algo)
        if self.prefix_cache_policy not in (None, "hash"):
            self.kv.state_prefix = self._state_prefix_cache(self.prefix_cache_policy)
        self.storage = KVStorage(self.memory_plan, self.device)
        self.scheduler = Scheduler(self.kv, args.max_num_seqs, budget, args.enable_chunked_prefill, args.preemption_mode)
        self.runner = ModelRunner(self.model, self.storage, [g.spec for g in groups], self.device, self.attention,
                                  method if method is not None and method.decode_hooks else None)
        self.inputs = InputProcessor(self.tokenizer, cfg.vocab_size, self.max_model_len, self.kv, args.max_logprobs)
        self.sampler = Sampler()
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        self.branching = Branching(self.kv, self.tokenizer, self.output.start, self._generator, self.max_model_len)
        self.checkpoints = Checkpoints(self.kv)
        self.compression = Compression(method, self.kv, cfg.num_hidden_layers, cfg.num_key_value_heads, self.runner.kv_caches)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_aborted": 0, "kv_bytes_read": 0}

    def _mamba_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """A hybrid's (conv, SSM) state dtypes from vLLM's two flags; "auto" follows the model, then the first flag."""
        conv = dtype if self.args.mamba_cache_dtype == "auto" else parse_dtype(self.args.mamba_cache_dtype, "mamba_cache_dtype")
        ssm = conv if self.args.mamba_ssm_cache_dtype == "auto" else parse_dtype(self.args.mamba_ssm_cache_dtype, "mamba_ssm_cache_dtype")
        return conv, ssm

    def _prefix_cache_policy(self) -> str | None:
        """None (off), a tree policy (hybrids: marconi, sglang+ or vllm+, since a block hash cannot resume a Mamba2 state,
        which only a checkpoint at exactly the hit's length can; attention-only models: lru) or, for attention-only
        models, "hash" (vLLM's block hashes)."""
        args, cfg = self.args, self.model_config
        if args.enable_prefix_caching is False:
            return None
        hybrid = bool(cfg.mamba_layers)
        policy = args.prefix_cache_policy or ("marconi" if hybrid else "lru")
        if (policy in POLICIES) != hybrid:
            allowed = ("marconi, sglang+ or vllm+ (a hybrid's states need checkpoints)" if hybrid else
                       "lru or hash (marconi, sglang+ and vllm+ choose a hybrid's states)")
            raise InvalidArgumentError("prefix_cache_policy", f"must be {allowed} for {cfg.architecture}, got {policy!r}")
        if args.prefix_cache_alpha is not None and policy != "marconi":
            raise InvalidArgumentError("prefix_cache_alpha", f"applies to the marconi policy only, got it with {policy!r}")
        return policy

    def _state_prefix_cache(self, policy: str) -> StatePrefixCache:
        """The tree sized by the model's real bytes (a checkpoint: one slot of every Mamba2 group) and the whole KV budget;
        an attention-only model's is vLLM+'s tree with no state to hold."""
        plan = self.memory_plan
        state_bytes = sum(g.bytes_per_block for g in plan.groups if not g.group.bytes_per_token)
        costs = HybridCosts.from_model(self.model_config, plan.bytes_per_token, state_bytes)
        alpha = self.args.prefix_cache_alpha
        rules = Policy("vllm+" if policy == "lru" else policy, alpha=alpha or 0.0, block_size=plan.block_size)
        return StatePrefixCache(self.kv, costs, plan.budget_bytes, rules,
                                tune=policy == "marconi" and alpha is None)

    def _kv_method(self) -> KVMethod | None:
        """The engine's KV method; for now it needs every layer to be full attention (a window's or a Mamba2 layer's
        cache is not the sequence's tokens slot by slot)."""
        method = build_method(self.args.kv_method, self.args.kv_method_config)
        cfg = self.model_config
        if method is not None:
            method.check_engine(self.args.block_size)
        if method is not None and (cfg.mamba_layers or cfg.mlp_layers or any(w is not None for w in cfg.sliding_windows)):
            raise InvalidArgumentError("kv_method", f"{method.name} needs a model whose layers are all full attention; {cfg.architecture} "
                                       "has sliding-window, Mamba2 or MLP-only layers")
        return method

    def _check_plan(self) -> None:
        if self.args.kv_host_memory is not None:  # unset, the host tier matches the device pool block for block
            self._check_host_tier()
        for g in self.memory_plan.groups:
            if g.num_blocks < 1:
                knob = "kv_cache_memory" if self.args.kv_cache_memory is not None or self.device.type != "cuda" else "gpu_memory_utilization"
                raise OutOfKVCacheError(f"{knob}: the KV budget of {g.budget_bytes} bytes for the {g.group.spec.label} layers holds no block of "
                                        f"{g.bytes_per_block} bytes; raise {knob}")

    def _check_host_tier(self) -> None:
        tiers = [g for g in self.memory_plan.groups if g.tier_blocks is not None]
        if not tiers:
            raise InvalidArgumentError("kv_host_memory", f"sizes the host tier of V, which only --kv-method kcache keeps; got it with "
                                       f"kv_method {self.args.kv_method!r}")
        for g in tiers:
            need = g.group.spec.max_blocks(self.max_model_len, 0)
            if g.tier_blocks < need:
                raise OutOfKVCacheError(f"kv_host_memory: the host tier's {g.tier_budget_bytes} bytes hold V for {g.tier_blocks} blocks, and one "
                                        f"sequence of max_model_len ({self.max_model_len}) tokens needs {need} blocks of "
                                        f"{g.group.tier_bytes_per_block} bytes; raise kv_host_memory or lower max_model_len")

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: PromptInput | EngineInput, params: SamplingParams | BeamSearchParams, request_id: str | None = None,
                    stream: bool = False, checkpoint_at: list[int] | tuple[int, ...] = (), start_from: StateCheckpoint | None = None) -> str:
        """Validate and queue a request; a bad one raises before it touches any engine state. A prompt already
        processed (``self.inputs.process``) is queued as it is.

        ``checkpoint_at``: token positions where the prefill stops to keep the cache state (collect them with
        ``take_checkpoints``); ``start_from``: a checkpoint whose tokens the prompt starts with, so only the rest is computed."""
        inp = self.inputs.process(prompt, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        params, ids = inp.params, inp.prompt_token_ids
        positions = check_checkpoint_args(ids, params.prompt_logprobs is not None, checkpoint_at, start_from)
        req = Request(request_id, inp.prompt, ids, params, RequestMetrics(time.monotonic()), beam=inp.beam, stream=stream)
        seq = Sequence(list(ids), len(ids))
        if params.seed is not None:
            seq.generator = self._generator(params.seed, 0)
        req.seqs.append(seq)
        if self.compression.method is not None and (positions or start_from is not None):
            raise InvalidArgumentError("checkpoint_at" if positions else "start_from", "state checkpoints cannot be combined with a kv_method yet")
        self.checkpoints.attach(req, seq, positions, start_from)
        self.compression.attach(seq)
        self.output.start(req, seq)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += len(ids)
        return request_id

    def _generator(self, seed: int, index: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed + 1_000_003 * index)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; return its final output (``finish_reason`` "abort"), or None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for s in req.live_seqs:
            s.finish_reason = "abort"
        self._retire(req)
        return self.output.make_output(req)

    def take_checkpoints(self, request_id: str) -> list[StateCheckpoint]:
        """The state checkpoints a request's ``checkpoint_at`` has produced so far; the caller releases each when done."""
        return self.checkpoints.take(request_id)

    def release_checkpoint(self, ckpt: StateCheckpoint) -> None:
        self.kv.release(ckpt)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return outputs of requests that finished (and of streamed ones that moved)."""
        self.compression.retry()
        plan = self.scheduler.schedule()
        rows = self.compression.query_rows(plan.chunks)
        logits = self.runner.execute(replace(plan.output, query_rows=rows) if rows else plan.output)
        if plan.empty:
            return self._evict_unservable()
        now = time.monotonic()
        for c in plan.chunks:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now
            c.seq.num_computed_tokens += c.num_tokens
            if c.seq.seq_id in logits.prompt:
                self._add_prompt_logprobs(c.request, c.start, logits.prompt[c.seq.seq_id])
            if not c.seq.num_evicted:  # a compressed cache is no prefix of anything: never offered to others
                self.kv.cache_computed(c.seq.seq_id, c.seq.token_ids, c.seq.num_computed_tokens)
            if c.num_tokens == 1:
                self.counters["kv_bytes_read"] += self._decode_bytes_read(c.seq.num_cached_slots, c.seq.num_computed_tokens)
            self.checkpoints.after_chunk(c.request, c.seq, c.start)
            self.compression.after_chunk(c.seq, logits.queries.get(c.seq.seq_id))
        if plan.to_sample:
            self._sample(plan.to_sample, logits)
        return self._finish_and_emit(plan)

    def _decode_bytes_read(self, num_slots: int, num_tokens: int) -> int:
        """The K/V bytes one decode token's attention reads from a cache of ``num_slots`` of its ``num_tokens``: every slot's K and V (a
        sliding window's last ones), or in the KV method's layers the K and V rows it says it reads."""
        total = 0
        cfg, method = self.model_config, self.compression.method
        for g in self.memory_plan.groups:
            spec = g.group.spec
            if spec.bytes_per_token:  # a Mamba2 state is read whole whatever the length: not K/V
                rows = num_slots if spec.sliding_window is None else min(num_slots, spec.sliding_window)
                k_rows, v_rows = (method.rows_read(rows, num_tokens, spec.block_size, cfg.num_attention_heads // cfg.num_key_value_heads)
                                  if method is not None and spec.kv_method else (rows, rows))
                total += (k_rows + v_rows) * spec.row_bytes * len(g.group.layers)
        return total

    def _add_prompt_logprobs(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """Logits at position i score prompt token i+1; position 0 has no logprob (None, as vLLM)."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        ids = req.prompt_token_ids
        n = min(logits.shape[0], len(ids) - 1 - start)
        if start + 1 != len(req.prompt_logprobs) or n <= 0:
            return
        targets = torch.tensor(ids[start + 1 : start + 1 + n], device=logits.device)
        for entry in compute_logprobs(logits[:n], targets, req.params.prompt_logprobs):
            req.prompt_logprobs.append(self.output.decoded(entry))

    def _sample(self, requests: list[Request], logits: StepLogits) -> None:
        """Sample every live sequence of ``requests`` (a new sample of ``n > 1`` from its parent's logits), rows ordered as
        the step's logits table so that a plain decode batch is read from it without a copy."""
        entries: list[tuple[int, SamplingRow, tuple[Request, Sequence]]] = []
        for req in requests:
            if req.beam is not None:
                self.branching.beam_step(req, torch.stack([logits.last[s.seq_id] for s in req.live_seqs]))
                self._note_token(req, time.monotonic())
                continue
            self.branching.fork_samples(req)
            for s in req.live_seqs:
                row = logits.last_row.get(s.seq_id, logits.last_row.get(req.seqs[0].seq_id))
                entries.append((row, SamplingRow(req.params, s.token_ids[: s.prompt_len], s.output_token_ids, s.generator,
                                                 self.output.banned_tokens(req, s)), (req, s)))
        if not entries:
            return
        entries.sort(key=lambda e: e[0])
        index = [e[0] for e in entries]
        table = logits.table
        batch = table if index == list(range(table.shape[0])) else table[torch.tensor(index, device=table.device)]
        result = self.sampler(batch, [e[1] for e in entries])
        now = time.monotonic()
        for (_, _, (req, s)), token, lps in zip(entries, result.token_ids, result.logprobs):
            chosen = lps.get(token, (0.0, 0))[0] if lps else 0.0
            self.output.append(req, s, token, chosen, self.output.decoded(lps))
            self._note_token(req, now)

    def _note_token(self, req: Request, now: float) -> None:
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        m.num_generation_tokens += 1
        self.counters["generation_tokens"] += 1

    def _evict_unservable(self) -> list[RequestOutput]:
        """A request that cannot fit even with the whole pool to itself ends with "length"; nothing else is touched."""
        sched = self.scheduler
        if not sched.waiting or sched.running or sched.swapped:
            return []
        req = sched.waiting[0]
        for s in req.live_seqs:
            s.finish_reason = "length"
        self._retire(req)
        return [self.output.make_output(req)]

    def _finish_and_emit(self, plan: StepPlan) -> list[RequestOutput]:
        """Free the blocks of sequences that stopped this step; retire requests with none left running."""
        outputs = []
        for req in plan.to_sample:
            for s in req.seqs:
                if s.finished and self.kv.has(s.seq_id):
                    self.checkpoints.keep(s)
                    self.kv.free(s.seq_id)
            if not req.live_seqs:
                self._retire(req)
            if req.is_finished or req.stream:
                outputs.append(self.output.make_output(req))
        return outputs

    def _retire(self, req: Request) -> None:
        """The one place a request ends (finished, aborted, or unservable): every sequence has a finish reason; its blocks go
        back, it leaves the scheduler, and it is counted once."""
        assert not req.live_seqs, "a request retires only when each of its sequences has a finish reason"
        for s in req.seqs:
            self.checkpoints.keep(s)
            self.kv.free(s.seq_id)
        self.checkpoints.retire(req)
        self.compression.retire([s.seq_id for s in req.seqs])
        req.status = RequestStatus.FINISHED
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        aborted = any(s.finish_reason == "abort" for s in req.seqs)
        self.counters["requests_aborted" if aborted else "requests_finished"] += 1
