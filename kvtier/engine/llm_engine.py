"""The engine loop: add requests, then ``step()``: schedule -> run the model -> sample -> emit outputs."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import torch

from kvtier.attention.metadata import ScheduledTokens
from kvtier.attention.registry import get_backend
from kvtier.cache.kv_cache_manager import KVCacheManager, blocks_needed
from kvtier.cache.kv_storage import KVStorage, MemoryPlan
from kvtier.config import EngineArgs, GiB
from kvtier.engine import beam_search
from kvtier.engine.model_runner import ModelRunner
from kvtier.engine.output_processor import OutputProcessor
from kvtier.engine.scheduler import Scheduler, SchedulerOutput
from kvtier.engine.sequence import Request, RequestStatus, Sequence
from kvtier.engine.step_input import StepInput
from kvtier.errors import InvalidArgumentError, OutOfKVCacheError
from kvtier.models.config import ModelConfig, parse_dtype
from kvtier.models.loader import load_model, resolve_model_path
from kvtier.models.registry import model_class
from kvtier.outputs import RequestMetrics, RequestOutput
from kvtier.sampling.sampler import Sampler, SamplingRow, compute_logprobs
from kvtier.sampling_params import BeamSearchParams, SamplingParams
from kvtier.tokenizer import Tokenizer

PromptInput = str | dict


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
        if self.max_model_len > cfg.max_position_embeddings and cfg.rope.rope_type == "default":
            raise InvalidArgumentError("max_model_len", f"must be <= max_position_embeddings ({cfg.max_position_embeddings}), got {self.max_model_len}")
        self.tokenizer = Tokenizer.from_pretrained(args.tokenizer or path)
        torch.manual_seed(args.seed)
        self.attention = get_backend(args.attention_backend)
        self.model = load_model(path, cfg, dtype, self.device, self.max_model_len, self.attention)
        self.memory_plan = self._plan_memory()
        if self.memory_plan.num_blocks < 1:
            knob = "kv_cache_memory" if args.kv_cache_memory is not None or self.device.type != "cuda" else "gpu_memory_utilization"
            raise OutOfKVCacheError(f"{knob}: the KV budget of {self.memory_plan.budget_bytes} bytes holds no block of "
                                    f"{self.memory_plan.bytes_per_block} bytes; raise {knob}")
        self.kv = KVCacheManager(self.memory_plan.num_blocks, args.block_size, args.enable_prefix_caching, self.memory_plan.num_host_blocks,
                                 args.prefix_caching_hash_algo)
        self.storage = KVStorage(self.memory_plan, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype, self.device)
        budget = args.max_num_batched_tokens or (2048 if args.enable_chunked_prefill else self.max_model_len)
        if not args.enable_chunked_prefill and budget < self.max_model_len:
            raise InvalidArgumentError("max_num_batched_tokens", f"must be >= max_model_len ({self.max_model_len}) without chunked prefill, got {budget}")
        self.scheduler = Scheduler(self.kv, args.max_num_seqs, budget, args.enable_chunked_prefill, args.preemption_mode)
        self.runner = ModelRunner(self.model, self.storage, self.device, self.attention)
        self.sampler = Sampler()
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_aborted": 0}

    # ---- memory ------------------------------------------------------------------------------
    def _plan_memory(self) -> MemoryPlan:
        cfg, args = self.model_config, self.args
        per_token = cfg.kv_bytes_per_token
        swap = int(args.swap_space * GiB) if args.preemption_mode == "swap" else 0
        if args.kv_cache_memory is not None:
            budget = args.kv_cache_memory
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # activations: a step's hidden states and MLP, plus fp32 logits for every running sequence
            act = (args.max_num_batched_tokens or 2048) * (cfg.hidden_size * 8 + cfg.intermediate_size * 4) * 4
            act += args.max_num_seqs * cfg.vocab_size * 4 * 3
            # leave (1 - utilization) of the whole GPU free, counting what others already hold
            budget = free - int(total * (1 - args.gpu_memory_utilization)) - act
        else:
            budget = GiB
        return MemoryPlan.from_budget(max(0, budget), swap, args.block_size, per_token)

    # ---- requests ----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Validate a prompt (text or ``{"prompt_token_ids": [...]}``) and return (text, token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("prompt", "must be a non-empty string")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
            if not isinstance(ids, list) or not ids:
                raise InvalidArgumentError("prompt_token_ids", "must be a non-empty list of token ids")
            vocab = self.model_config.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidArgumentError("prompt_token_ids", f"every id must be an integer in [0, {vocab})")
        else:
            raise InvalidArgumentError("prompt", f"must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise InvalidArgumentError("prompt", "tokenizes to zero tokens")
        if len(ids) >= self.max_model_len:
            raise InvalidArgumentError("prompt", f"has {len(ids)} tokens; it must be shorter than max_model_len ({self.max_model_len})")
        if blocks_needed(len(ids) + 1, self.kv.block_size) > self.kv.pool.num_blocks:
            raise InvalidArgumentError("prompt", f"has {len(ids)} tokens, more than the KV cache's {self.kv.pool.num_blocks * self.kv.block_size} slots")
        return text, list(ids)

    def check_params(self, params: SamplingParams | BeamSearchParams) -> None:
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise InvalidArgumentError("sampling_params", f"must be SamplingParams or BeamSearchParams, got {type(params).__name__}")
        if isinstance(params, BeamSearchParams):
            width = ("beam_width", params.beam_width)
        else:
            width = ("best_of", params.best_of) if params.best_of else ("n", params.n)
        if width[1] > self.kv.pool.num_blocks:
            raise InvalidArgumentError(width[0], f"must be <= {self.kv.pool.num_blocks}, the KV cache's blocks (a request's sequences run together, "
                                                 f"each on blocks of its own), got {width[1]}")
        if isinstance(params, SamplingParams):
            for name in ("logprobs", "prompt_logprobs"):
                value = getattr(params, name)
                if value is not None and value > self.args.max_logprobs:
                    raise InvalidArgumentError(name, f"must be <= max_logprobs ({self.args.max_logprobs}), got {value}")

    def add_request(self, prompt: PromptInput, params: SamplingParams | BeamSearchParams, request_id: str | None = None, stream: bool = False) -> str:
        """Validate and queue a request; a bad one raises before it touches any engine state."""
        self.check_params(params)
        text, ids = self.tokenize_prompt(prompt)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in flight")
        beam = None
        if isinstance(params, BeamSearchParams):
            beam, params = params, SamplingParams(n=params.beam_width, temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)
        elif params.use_beam_search:
            beam = BeamSearchParams(params.best_of or params.n, params.max_tokens or 16, params.ignore_eos, 0.0, params.length_penalty,
                                    params.early_stopping)
        req = Request(request_id, text, ids, params, RequestMetrics(time.monotonic()), beam=beam, stream=stream)
        seq = Sequence(list(ids), len(ids))
        if params.seed is not None:
            seq.generator = self._generator(params.seed, 0)
        req.seqs.append(seq)
        self.output.start(req, seq)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += len(ids)
        return request_id

    def _generator(self, seed: int, index: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed + 1_000_003 * index)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; return its final output (``finish_reason`` "abort"), or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.remove(req)
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
            self.kv.free(s.seq_id)
        req.status = RequestStatus.FINISHED
        self.counters["requests_aborted"] += 1
        return self.output.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return outputs of requests that finished (and of streamed ones that moved)."""
        plan = self.scheduler.schedule()
        logits = self.runner.execute(self._step_input(plan))
        if plan.empty:
            return self._evict_unservable()
        now = time.monotonic()
        for c in plan.chunks:
            if c.request.metrics.first_scheduled_time is None:
                c.request.metrics.first_scheduled_time = now
            c.seq.num_computed_tokens += c.num_tokens
            if c.seq.seq_id in logits.prompt:
                self._add_prompt_logprobs(c.request, c.start, logits.prompt[c.seq.seq_id])
            self.kv.cache_computed(c.seq.seq_id, c.seq.token_ids, c.seq.num_computed_tokens)
        if plan.to_sample:
            self._sample(plan.to_sample, logits.last)
        return self._finish_and_emit(plan)

    def _step_input(self, plan: SchedulerOutput) -> StepInput:
        """The plan as the runner's plain data, with the block moves the cache decided for it."""
        seqs = tuple(ScheduledTokens(c.seq.seq_id, c.seq.token_ids[c.start : c.start + c.num_tokens], c.start, self.kv.block_ids(c.seq.seq_id))
                     for c in plan.chunks)
        sample_ids = frozenset(s.seq_id for r in plan.to_sample for s in r.live_seqs)
        want_prompt = frozenset(c.seq.seq_id for c in plan.chunks if self._wants_prompt_logprobs(c.request, c.seq, c.start))
        return StepInput(seqs, sample_ids, want_prompt, self.kv.take_ops())

    def _wants_prompt_logprobs(self, req: Request, seq: Sequence, start: int) -> bool:
        prompt_len = req.seqs[0].prompt_len
        return (req.params.prompt_logprobs is not None and seq.index == 0 and start < prompt_len - 1
                and (req.prompt_logprobs is None or len(req.prompt_logprobs) < prompt_len))

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

    def _sample(self, requests: list[Request], last: dict[int, torch.Tensor]) -> None:
        rows: list[SamplingRow] = []
        row_logits: list[torch.Tensor] = []
        targets: list[tuple[Request, Sequence]] = []
        for req in requests:
            if req.beam is not None:
                self._beam_step(req, torch.stack([last[s.seq_id] for s in req.live_seqs]))
                continue
            self._fork_samples(req)
            for s in req.live_seqs:
                parent_logits = last.get(s.seq_id, last.get(req.seqs[0].seq_id))
                rows.append(SamplingRow(req.params, s.token_ids[: s.prompt_len], s.output_token_ids, s.generator, self.output.banned_tokens(req, s)))
                row_logits.append(parent_logits)
                targets.append((req, s))
        if not rows:
            return
        result = self.sampler(torch.stack(row_logits), rows)
        now = time.monotonic()
        for (req, s), token, lps in zip(targets, result.token_ids, result.logprobs):
            chosen = lps.get(token, (0.0, 0))[0] if lps else 0.0
            self.output.append(req, s, token, chosen, self.output.decoded(lps))
            self._note_token(req, now)

    def _fork_samples(self, req: Request) -> None:
        """n > 1: after the prompt's first logits, split into n sequences sharing the prompt's blocks."""
        if req.forked or req.params.n == 1:
            return
        parent = req.seqs[0]
        for i in range(1, req.params.n):
            child = parent.fork(i)
            if req.params.seed is not None:
                child.generator = self._generator(req.params.seed, i)
            self.kv.fork(parent.seq_id, child.seq_id)
            self.output.start(req, child)
            req.seqs.append(child)
        req.forked = True

    def _beam_step(self, req: Request, logits: torch.Tensor) -> None:
        parents = req.live_seqs
        chosen = beam_search.select(req, logits, self.tokenizer.eos_token_ids)
        kept: set[int] = set()
        beams: list[tuple[Sequence, int, float]] = []
        for parent, token, lp in chosen:  # fork before any parent takes its token
            if parent.seq_id in kept:
                child = parent.fork(0)
                self.kv.fork(parent.seq_id, child.seq_id)
                beams.append((child, token, lp))
            else:
                kept.add(parent.seq_id)
                beams.append((parent, token, lp))
        for p in parents:
            if p.seq_id not in kept:
                self.kv.free(p.seq_id)
        now = time.monotonic()
        for seq, token, lp in beams:
            seq.token_ids.append(token)
            seq.cumulative_logprob += lp
        self._note_token(req, now)
        req.seqs = [b[0] for b in beams]
        if beam_search.is_done(req, self.max_model_len):
            for seq in req.seqs:
                seq.finish_reason = "length"

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
        req.status = RequestStatus.FINISHED
        sched.remove(req)
        self.requests.pop(req.request_id, None)
        self.counters["requests_finished"] += 1
        return [self.output.make_output(req)]

    def _finish_and_emit(self, plan) -> list[RequestOutput]:
        outputs = []
        for req in plan.to_sample:
            for s in req.seqs:
                if s.finished and s.seq_id in self.kv.tables:
                    self.kv.free(s.seq_id)
            if not req.live_seqs:
                req.status = RequestStatus.FINISHED
                self.scheduler.remove(req)
                self.requests.pop(req.request_id, None)
                self.counters["requests_finished"] += 1
            if req.is_finished or req.stream:
                outputs.append(self.output.make_output(req))
        return outputs
