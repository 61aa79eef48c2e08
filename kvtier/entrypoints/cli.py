"""``kvtier`` command line: generate, chat, info, serve, eval, make-checkpoint, train-tiny. Flags follow vLLM's names."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kvtier.config import EngineArgs
from kvtier.entrypoints.openai.metrics import METRIC_NAMES
from kvtier.errors import InvalidArgumentError, KvtierError
from kvtier.eval.harness import EVAL_TASKS, PHRASING_NAMES, markdown_table, run_eval
from kvtier.eval.haystacks import HAYSTACKS
from kvtier.eval.probe import PROTOCOLS
from kvtier.training.train_tiny import add_train_tiny_args, run_train_tiny

LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "trace")  # vLLM's --uvicorn-log-level choices
_FLAG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str, "float | None": float, "dict | str | None": str}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag-name`` per EngineArgs field (the model is ``--model``)."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "model":
            group.add_argument(flag, default=f.default, help=f"an HF checkpoint folder or a shipped model's name (default: {f.default})")
        else:
            group.add_argument(flag, type=_FLAG_TYPES[f.type], default=f.default)


def engine_kwargs(ns: argparse.Namespace) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs) if f.name != "model"}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None)


def sampling_params(ns: argparse.Namespace):
    from kvtier.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty, n=ns.n, seed=ns.sampling_seed, stop=ns.stop,
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM

    llm = LLM(ns.model, **engine_kwargs(ns))
    prompts = ns.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for out in llm.generate(prompts, sampling_params(ns), use_tqdm=len(prompts) > 1):
        for c in out.outputs:
            line = {"prompt": out.prompt, "index": c.index, "text": c.text, "finish_reason": c.finish_reason}
            print(json.dumps(line) if ns.json else f"{out.prompt}{c.text}")
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from kvtier.entrypoints.llm import LLM

    llm = LLM(ns.model, **engine_kwargs(ns))
    params = sampling_params(ns)
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    print("kvtier chat: type a message, empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        print(reply)
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    from kvtier.engine.llm_engine import LLMEngine
    from kvtier.engine.metrics import engine_metrics

    engine = LLMEngine(EngineArgs(model=ns.model, **engine_kwargs(ns)))
    cfg, plan = engine.model_config, engine.memory_plan
    params = sum(p.numel() for p in engine.model.parameters())
    info = {
        "architecture": cfg.architecture,
        "parameters": params,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_model_len": engine.max_model_len,
        "attention_layers": list(cfg.attention_layers),
        "mamba_layers": list(cfg.mamba_layers),
        "prefix_cache_policy": engine.prefix_cache_policy,
        "kv_method": engine.compression.describe(),
        "memory_plan": {
            "kv_budget_bytes": plan.budget_bytes,
            "kv_bytes_per_token": plan.bytes_per_token,
            "host_tier_bytes_per_token": plan.tier_bytes_per_token,
            "block_size": plan.block_size,
            "groups": [{
                "kind": g.group.spec.label,
                "layers": list(g.group.layers),
                "kv_bytes_per_token": g.group.bytes_per_token,
                "budget_bytes": g.budget_bytes,
                "share": g.budget_bytes / max(1, plan.budget_bytes),
                "bytes_per_block": g.bytes_per_block,
                "num_blocks": g.num_blocks,
                "num_host_blocks": g.num_host_blocks,
                "host_tier_bytes": g.tier_budget_bytes,  # V under --kv-method kcache (kv_host_memory)
                "max_cached_tokens": g.num_blocks * plan.block_size if g.group.bytes_per_token else None,  # a state slot holds no tokens
            } for g in plan.groups],
        },
        "kv_cache": {k: v for k, v in engine_metrics(engine).items() if k.startswith(("kv_", "mamba_"))},
    }
    print(json.dumps(info, indent=2) if ns.json else info_summary(ns.model, info))
    return 0


def _size(n: float) -> str:
    """Bytes in binary units, as a person reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def info_summary(model: str, info: dict) -> str:
    """``kvtier info`` for a person: the model, then where the KV memory goes."""
    plan, kv = info["memory_plan"], info["kv_cache"]
    rows = [
        ("model", model),
        ("architecture", f"{info['architecture']}, {info['parameters'] / 1e6:.2f} M parameters, {info['dtype']} on {info['device']}"),
        ("attention", f"{len(info['attention_layers'])} of {info['layers']} layers, {info['heads']} heads, "
                      f"{info['kv_heads']} KV heads of dimension {info['head_dim']}"),
        ("context", f"{info['max_model_len']} tokens"),
        ("KV per token", f"{_size(plan['kv_bytes_per_token'])} in blocks of {plan['block_size']} tokens"),
        ("KV budget", f"{_size(plan['kv_budget_bytes'])}, split among {len(plan['groups'])} layer group(s):"),
    ]
    for g in plan["groups"]:
        held = f"{g['max_cached_tokens']} tokens" if g["max_cached_tokens"] is not None else "one a sequence"
        unit = "blocks" if g["max_cached_tokens"] is not None else "slots"
        tier = f"; V in {_size(g['host_tier_bytes'])} of host tier" if g["host_tier_bytes"] else ""
        rows.append((f"  {g['kind']}", f"{len(g['layers'])} layers, {g['share']:.0%} = {_size(g['budget_bytes'])}: {g['num_blocks']} {unit} "
                                       f"of {_size(g['bytes_per_block'])}, {held}{tier}; {g['num_host_blocks']} swap {unit}"))
    rows.append(("blocks now", f"{kv['kv_blocks_free']} free, {kv['kv_blocks_cached']} cached, {kv['kv_blocks_used']} used"))
    if info["mamba_layers"]:
        free = kv["mamba_slots_total"] - kv["mamba_slots_used"] - kv["mamba_slots_cached"]
        rows.append(("slots now", f"{free} free, {kv['mamba_slots_cached']} cached, {kv['mamba_slots_used']} used"))
    policy = info["prefix_cache_policy"]
    rows.append(("prefix caching", "off" if policy is None else "on, block hashes" if policy == "hash" else
                 f"on, {policy}: a radix tree of checkpoints (docs/prefix-caching.md)"))
    method = info["kv_method"]
    rows.append(("KV method", method["name"] + "".join(f", {k} {v}" for k, v in method.items() if k != "name")))
    width = max(len(label) for label, _ in rows) + 3
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows) + "\n(--json prints all of this as JSON)"


def cmd_make_checkpoint(ns: argparse.Namespace) -> int:
    from kvtier.models.checkpoint_builder import build_random_checkpoint

    print(build_random_checkpoint(ns.path, **{name: getattr(ns, name) for name in _builder_options()}))
    return 0


def _builder_options() -> dict[str, inspect.Parameter]:
    """``build_random_checkpoint``'s keyword options: the flags of ``make-checkpoint``, with its defaults."""
    from kvtier.models.checkpoint_builder import build_random_checkpoint

    params = inspect.signature(build_random_checkpoint).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def cmd_serve(ns: argparse.Namespace) -> int:
    from kvtier.entrypoints.openai.api_server import run_server

    if ns.max_queue_len is not None and ns.max_queue_len < 1:
        raise InvalidArgumentError("max_queue_len", f"must be >= 1, got {ns.max_queue_len}")
    if not 0 < ns.port < 65536:
        raise InvalidArgumentError("port", f"must be in [1, 65535], got {ns.port}")
    args = EngineArgs(model=ns.model, **engine_kwargs(ns))
    if ns.shutdown_timeout < 0:
        raise InvalidArgumentError("shutdown_timeout", f"must be >= 0 s, got {ns.shutdown_timeout}")
    run_server(args, ns.host, ns.port, ns.served_model_name or ns.model, ns.api_key, ns.max_queue_len, ns.shutdown_timeout,
               ns.uvicorn_log_level, ns.enable_log_requests, ns.metric_names)
    return 0


def cmd_private_generate(ns: argparse.Namespace) -> int:
    from kvtier.mpc.private_generate import private_generate

    out = private_generate(ns.model, ns.prompt, max_tokens=ns.max_tokens, kv_method=ns.kv_method, kv_method_config=ns.kv_method_config,
                           protocol=ns.protocol)
    print(out.text)
    for p in out.programs:
        lan, wan = p["latency_s"]["LAN"], p["latency_s"]["WAN"]
        print(f"# {p['program']}: {p['bytes'] / 1e6:.1f} MB, {p['rounds']} rounds; LAN {lan:.2f} s, WAN {wan:.1f} s (communication only)",
              file=sys.stderr)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    kw = engine_kwargs(ns)
    method, config = kw.pop("kv_method"), kw.pop("kv_method_config")
    result = run_eval(ns.model, method, config, ns.budget or (), ns.task, ns.context, ns.trials, ns.sample_seed, ns.haystack, ns.protocol,
                      ns.phrasing, ns.variant or (), **kw)
    table = markdown_table(result)
    print(table)
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if ns.markdown_out:
        Path(ns.markdown_out).write_text(table + "\n")
    if ns.plot_out:
        from kvtier.eval.plots import plot_scores

        plot_scores([result], ns.plot_out)
    return 0


def _budget(text: str) -> float | int:
    """``--budget``: a whole number is a token count, anything else a fraction (checked with the method's config)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] or a whole number of tokens, got {text!r}") from None


def cmd_train_tiny(ns: argparse.Namespace) -> int:
    print(f"wrote {run_train_tiny(ns)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier: KV-cache-centric LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts (args or stdin lines)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_engine_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat through the checkpoint's chat template")
    chat.add_argument("--system", default=None)
    add_engine_flags(chat)
    add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)
    info = sub.add_parser("info", help="architecture, parameters, KV bytes per token and the memory plan")
    info.add_argument("--json", action="store_true", help="print the whole report as JSON")
    add_engine_flags(info)
    info.set_defaults(func=cmd_info)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="model name clients send (default: --model as given)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--max-queue-len", type=int, default=None, help="answer 503 when this many requests already wait")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get after SIGTERM")
    serve.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                       help="log each request's arrival and end, and uvicorn's access line, at INFO (off by default, as in vLLM)")
    serve.add_argument("--uvicorn-log-level", choices=LOG_LEVELS, default="info", help="log level of uvicorn and of kvtier's server log")
    serve.add_argument("--metric-names", choices=METRIC_NAMES, default="both",
                       help="Prometheus names at /metrics: kvtier's, vLLM's (vllm: prefix, model_name and engine labels, so vLLM dashboards work), or both")
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)
    ev = sub.add_parser("eval", help="what a KV method costs in accuracy or perplexity, beside the full cache, through the engine")
    ev.add_argument("--task", nargs="+", default=["passkey"], choices=EVAL_TASKS,
                    help="retrieval tasks (passkey, multikey, vartrack); commonwords (RULER's common-words extraction); agreement "
                         "(top-1 and KL against the full cache along its greedy continuation); perplexity (of the held-out text after "
                         "each context, read through the cache)")
    ev.add_argument("--context", nargs="+", type=int, default=[2048], help="context lengths in tokens")
    ev.add_argument("--budget", nargs="+", type=_budget, default=None,
                    help="the method's budget(s): fractions in (0, 1] or token counts (default: --kv-method-config's)")
    ev.add_argument("--trials", type=int, default=20, help="samples per cell, depths spread over [0, 1]")
    ev.add_argument("--haystack", choices=HAYSTACKS, default="noise", help="what the retrieval tasks' needles hide in (the others bring their own text)")
    ev.add_argument("--phrasing", choices=PHRASING_NAMES, default=None,
                    help="how passkey and multikey needles are worded; access-code and secret-number were in no training document "
                         "(default: each task's own)")
    ev.add_argument("--protocol", choices=PROTOCOLS, default="query-agnostic",
                    help="the question after compression, through decode (query-agnostic), or in the prompt before it (query-aware)")
    ev.add_argument("--variant", action="append", default=None, metavar="JSON",
                    help="an ablation run beside the method at each budget: config keys laid over --kv-method-config "
                         "(repeatable; '{}' keeps the plain config among them), e.g. '{\"hierarchy\": false}'")
    ev.add_argument("--sample-seed", type=int, default=0, help="seed of the samples and text windows (--seed seeds the engine)")
    ev.add_argument("--json-out", default=None)
    ev.add_argument("--markdown-out", default=None)
    ev.add_argument("--plot-out", default=None, help="a PNG of score against budget, a panel per task and context (needs matplotlib)")
    add_engine_flags(ev)
    ev.set_defaults(func=cmd_eval)
    pg = sub.add_parser("private-generate", help="greedy generation under secure multi-party computation (SecretFlow SPU): weights, "
                        "prompt and KV cache secret-shared, only the tokens revealed; needs the MPC environment (scripts/setup_mpc.sh)")
    pg.add_argument("--model", default="kvtier-tiny")
    pg.add_argument("--prompt", required=True)
    pg.add_argument("--max-tokens", type=int, default=8)
    pg.add_argument("--kv-method", choices=["none", "mpcache"], default="none")
    pg.add_argument("--kv-method-config", default=None, help="MPCache's config as JSON, e.g. '{\"budget\": 0.12}'")
    pg.add_argument("--protocol", choices=["semi2k", "cheetah", "aby3"], default="semi2k", help="2PC: semi2k, cheetah; 3PC: aby3")
    pg.set_defaults(func=cmd_private_generate)
    mk = sub.add_parser("make-checkpoint", help="write a random-weight Llama HF checkpoint folder")
    mk.add_argument("path")
    for name, p in _builder_options().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(p.default, bool):
            mk.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default)
        else:
            mk.add_argument(flag, type=type(p.default), default=p.default)
    mk.set_defaults(func=cmd_make_checkpoint)
    tt = sub.add_parser("train-tiny", help="train an embedded model on the stdlib corpus, measure it, write its model card (needs kvtier[train])")
    add_train_tiny_args(tt)
    tt.set_defaults(func=cmd_train_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except KvtierError as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
