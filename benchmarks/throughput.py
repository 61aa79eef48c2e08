"""Offline throughput: kvtier's continuous batching vs its peers, vLLM's CPU build and HF transformers.

Same model, same requests (ShareGPT-like lognormal lengths, greedy, ``ignore_eos``), same run. vLLM runs its offline
``LLM.generate`` on the very same token ids (``skip_tokenizer_init``) in its own environment (.venv-vllm, made by
benchmarks/peers/setup_vllm.sh on first use), with kvtier's settings: the KV budget (``VLLM_CPU_KVCACHE_SPACE``),
``max_num_seqs``, ``max_num_batched_tokens``, prefix caching, fp32, and OpenMP threads bound to the machine's cores.
HF is run the way vLLM's ``benchmark_throughput --backend hf`` runs it: requests in arrival order, packed into
batches of up to ``--hf-batch-size``, each batch generating its longest requested output. Prints tokens/s of each,
kvtier's ratio to each peer, each one's peak memory (the process tree's proportional set size), and kvtier's KV
waste sampled during the run.

    python benchmarks/throughput.py                          # reference model, 1000 requests, kvtier and HF
    python benchmarks/throughput.py --backend kvtier vllm    # kvtier and vLLM-CPU
    python benchmarks/throughput.py --num-prompts 100        # quicker
    python benchmarks/throughput.py --reference hybrid       # the reference hybrid: attention at layers 2 and 6, Mamba2 elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.proc_memory import PeakMemory  # noqa: E402
from peers.vllm_env import vllm_cpu_env  # noqa: E402
from workload import Request, add_workload_args, describe, make_workload  # noqa: E402

from kvtier.config import EngineArgs  # noqa: E402
from kvtier.engine.llm_engine import LLMEngine  # noqa: E402
from kvtier.engine.metrics import engine_metrics  # noqa: E402
from kvtier.machine import machine_line  # noqa: E402
from kvtier.models.checkpoint_builder import build_random_checkpoint  # noqa: E402
from kvtier.sampling_params import SamplingParams  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
VLLM_PYTHON = PEERS.parent.parent / ".venv-vllm" / "bin" / "python"
BACKENDS = ("kvtier", "vllm", "hf")
REFERENCE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408, vocab_size=32000)


# The reference Llama's size as a Bamba hybrid: attention at layers 2 and 6, Mamba2 (HF's Bamba defaults, expand 2) elsewhere
HYBRID = dict(attn_layer_indices=[2, 6], mamba_n_heads=16, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4,
              mamba_expand=2, mamba_chunk_size=256)


def reference_model(path: Path) -> Path:
    """The issue's reference Llama (random weights, fp32), built once and reused."""
    if not (path / "config.json").is_file():
        build_random_checkpoint(path, **REFERENCE, dtype="float32", seed=0)
    return path


def reference_hybrid(path: Path) -> Path:
    """The reference hybrid, built by transformers (random weights, fp32, seed 0) with the reference Llama's tokenizer."""
    if not (path / "config.json").is_file():
        import shutil

        import transformers

        llama = reference_model(path.parent / "reference-llama")
        cfg = transformers.BambaConfig(**REFERENCE, **HYBRID, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=4096)
        cfg.architectures = ["BambaForCausalLM"]
        torch.manual_seed(0)
        transformers.BambaForCausalLM(cfg).save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(llama / f, path / f)
    return path


def run_kvtier(model: Path, reqs: list[Request], args: argparse.Namespace) -> dict:
    engine = LLMEngine(EngineArgs(model=str(model), kv_cache_memory=int(args.kv_cache_gib * (1 << 30)), max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False if args.no_prefix_caching else None,
                                  prefix_cache_policy=args.prefix_cache_policy))
    start = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request({"prompt_token_ids": r.prompt_token_ids}, SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True), str(i))
    done, steps, waste_pool, waste_used = 0, 0, [], []
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done += 1
                out_tokens += len(out.outputs[0].token_ids)
        steps += 1
        if steps % args.waste_every == 0:
            m = engine_metrics(engine)
            if m["kv_blocks_used"]:
                waste_pool.append(m["kv_waste_fraction_of_pool"])
                waste_used.append(m["kv_waste_fraction_of_used"])
    elapsed = time.perf_counter() - start
    m = engine_metrics(engine)
    assert done == len(reqs) and out_tokens == sum(r.output_len for r in reqs), "kvtier lost tokens or requests"
    return {
        "elapsed_s": elapsed, "steps": steps, "preemptions": m["num_preemptions"],
        "waste_of_pool_mean": sum(waste_pool) / max(1, len(waste_pool)), "waste_of_pool_max": max(waste_pool, default=0.0),
        "waste_of_used_mean": sum(waste_used) / max(1, len(waste_used)), "waste_of_used_max": max(waste_used, default=0.0),
        "kv_blocks": m["kv_blocks_total"],
    }


def run_hf(model: Path, reqs: list[Request], args: argparse.Namespace) -> dict:
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the device kvtier picks with device="auto"
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval().to(device)
    start = time.perf_counter()
    i = 0
    while i < len(reqs):
        batch = reqs[i : i + args.hf_batch_size]
        i += len(batch)
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids) :] = 1
        new = max(r.output_len for r in batch)
        with torch.no_grad():
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + new
    return {"elapsed_s": time.perf_counter() - start}


def run_vllm(model: Path, reqs: list[Request], args: argparse.Namespace) -> dict:
    """vLLM-CPU in its own environment, driven through benchmarks/peers/vllm_offline.py; its log goes to
    .cache/vllm-peer.log."""
    if not VLLM_PYTHON.exists():
        subprocess.run(["bash", str(PEERS / "setup_vllm.sh")], check=True)
    env = vllm_cpu_env(args.kv_cache_gib)
    settings = {"dtype": "float32", "max_model_len": json.loads((model / "config.json").read_text()).get("max_position_embeddings", 4096),
                "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                "enable_prefix_caching": not args.no_prefix_caching}
    with tempfile.TemporaryDirectory() as tmp:
        request, answer, log = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(".cache/vllm-peer.log")
        request.write_text(json.dumps({"model": str(model.resolve()), "prompts": [r.prompt_token_ids for r in reqs],
                                       "output_lens": [r.output_len for r in reqs], "settings": settings}))
        with log.open("w") as out:
            proc = subprocess.Popen([str(VLLM_PYTHON), str(PEERS / "vllm_offline.py"), str(request), str(answer)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env})
            with PeakMemory(proc.pid) as mem:
                proc.wait()
        if proc.returncode:
            raise SystemExit(f"vLLM failed (exit {proc.returncode}); its log: {log}")
        r = json.loads(answer.read_text())
    assert r["requests"] == len(reqs) and r["output_tokens"] == sum(x.output_len for x in reqs), "vLLM lost tokens or requests"
    return {"elapsed_s": r["elapsed_s"], "version": r["version"], "settings": {**r["settings"], **env}, "peak_memory_mib": mem.peak_mib}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint folder (default: the --reference model, built on first use)")
    p.add_argument("--reference", choices=["llama", "hybrid"], default="llama", help="the reference model to build and run when no --model is given")
    p.add_argument("--backend", nargs="+", choices=[*BACKENDS, "both", "all"], default=["both"],
                   help="engines to run, in this order: kvtier, vllm (vLLM-CPU), hf; both: kvtier and hf; all: the three")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prefix-cache-policy", default=None, help="the engine's prefix cache (default: the model's; lru or hash for attention-only models)")
    p.add_argument("--waste-every", type=int, default=10, help="sample KV waste every N engine steps")
    p.add_argument("--json-out", type=Path, default=None)
    add_workload_args(p)
    args = p.parse_args(argv)
    model = args.model or (reference_model(Path(".cache/reference-llama")) if args.reference == "llama" else reference_hybrid(Path(".cache/reference-hybrid")))
    reqs = make_workload(args, vocab_size=REFERENCE["vocab_size"] if args.model is None else json.loads((model / "config.json").read_text())["vocab_size"])
    prompt_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    output_tokens = sum(r.output_len for r in reqs)
    print(f"machine: {machine_line()}")
    print(f"workload: {describe(reqs)}")
    result = {"machine": machine_line(), "workload": describe(reqs), "args": {k: str(v) for k, v in vars(args).items()}}
    chosen = {b for name in args.backend for b in {"both": ("kvtier", "hf"), "all": BACKENDS}.get(name, (name,))}
    for name, fn in (("kvtier", run_kvtier), ("vllm", run_vllm), ("hf", run_hf)):
        if name not in chosen:
            continue
        if name == "vllm":
            r = fn(model, reqs, args)
        else:
            with PeakMemory(os.getpid()) as mem:
                r = fn(model, reqs, args)
            r["peak_memory_mib"] = mem.peak_mib
        r["output_tokens_per_s"] = output_tokens / r["elapsed_s"]
        r["total_tokens_per_s"] = (prompt_tokens + output_tokens) / r["elapsed_s"]
        result[name] = r
        rest = json.dumps({k: v for k, v in r.items() if k != "elapsed_s"}, default=float)
        print(f"{name}: {r['elapsed_s']:.1f} s, {r['output_tokens_per_s']:.1f} output tok/s, {r['total_tokens_per_s']:.1f} total tok/s  {rest}")
    for peer in ("vllm", "hf"):
        if "kvtier" in result and peer in result:
            ratio = result[peer]["elapsed_s"] / result["kvtier"]["elapsed_s"]
            result[f"ratio_kvtier_over_{peer}"] = ratio
            print(f"ratio kvtier / {peer} throughput: {ratio:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
