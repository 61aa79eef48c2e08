#!/usr/bin/env bash
# The GPU checks of issues 21 (KCache's GPU path) and 23 (throughput against HF transformers on a GPU), in one run on a
# lent CUDA machine. From the repository root, with $OUT set to a folder that comes back:
#
#     bash scripts/device_check.sh
#
# Steps, each under its own timeout so one failure leaves the others' figures:
#   1. carried wheels (.whl/*.whl: kvtier's runtime dependencies missing from the image, for the server) into /tmp/site
#   2. sanity: torch sees the GPU (a matmul, pinned memory), kvtier generates on it with and without KCache
#   3. benchmarks/kcache_gpu.py: exactness, the decode step's parts, engine throughput  -> kcache-gpu.{json,md}
#   4. benchmarks/throughput.py: kvtier vs HF transformers on the GPU (builds .cache/reference-llama first)
#                                                                                     -> throughput-gpu.{json,md}
# Files in $OUT: device_check.log (everything printed), kcache-gpu.json, kcache-gpu.md, throughput-gpu.json,
# throughput-gpu.md. Expected total: about 4 to 5 minutes on an H200 (not yet run there).
#
# Knobs (environment): NUM_PROMPTS (throughput requests, default 1000, as the H100 run), HF_BATCH (64),
# KCACHE_ARGS (more arguments for kcache_gpu.py), T_KCACHE / T_THROUGHPUT (seconds, default 180 / 180).
# Worst case, every step at its timeout: about 8 minutes (30 + 40 + 60 + 180 + 180 s).

set -o pipefail
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-/tmp/device-check-out}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
HF_BATCH=${HF_BATCH:-64}
T_KCACHE=${T_KCACHE:-180}
T_THROUGHPUT=${T_THROUGHPUT:-180}
declare -A RC
START=$SECONDS

say() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

# kvtier is not installed there: the repository root goes on the path (the benchmarks import it)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

say "1. wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    whls=$(ls .whl/*.whl)
    # typing_extensions only if the image's is older than the one carried (it would shadow the image's for everything)
    if $PY -c 'import importlib.metadata as m, sys; v = tuple(int(x) for x in m.version("typing_extensions").split(".")[:2]); sys.exit(0 if v >= (4, 16) else 1)' 2>/dev/null; then
        whls=$(echo "$whls" | grep -v typing_extensions)
    fi
    # shellcheck disable=SC2086
    timeout -k 5 30 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $whls 2>&1 | tee -a "$LOG"
    RC[wheels]=$?
    [ "${RC[wheels]}" = 0 ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
    echo "no .whl folder: nothing to install" | tee -a "$LOG"
    RC[wheels]=skipped
fi

say "2. sanity"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv; nproc; free -g | head -2; } 2>&1 | tee -a "$LOG"
timeout -k 5 40 $PY -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0))
x = torch.randn(4096, 4096, device="cuda")
y = (x @ x).norm().item()
torch.cuda.synchronize()
p = torch.empty(1 << 20, pin_memory=True)
print("matmul ok", y > 0, "pinned", p.is_pinned())
' 2>&1 | tee -a "$LOG"
RC[torch]=$?
timeout -k 5 60 $PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib

from kvtier import LLM, SamplingParams

params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
outs = {}
for name, kw in (("full", {}), ("kcache N=4", {"kv_method": "kcache", "kv_method_config": {"top_n": 4}}),
                 ("kcache N=all", {"kv_method": "kcache", "kv_method_config": {"top_n": 1.0}})):
    llm = LLM("kvtier-tiny", device="cuda", dtype="float32", kv_cache_memory=1 << 26, swap_space=0.25, **kw)
    outs[name] = list(llm.generate("def main():\n    ", params, use_tqdm=False)[0].outputs[0].token_ids)
    print(name, "device", llm.engine.device, "tokens", outs[name])
    del llm
print("kcache N=all == full:", outs["kcache N=all"] == outs["full"])
for mod in ("fastapi", "uvicorn", "pydantic", "kvtier.entrypoints.openai.api_server"):
    try:
        importlib.import_module(mod)
        print("import", mod, "ok")
    except Exception as e:  # noqa: BLE001
        print("import", mod, "FAILED:", type(e).__name__, e)
EOF
RC[kvtier]=$?

say "3. kcache GPU (issue 21)"
# shellcheck disable=SC2086
timeout -k 10 "$T_KCACHE" $PY benchmarks/kcache_gpu.py --device cuda --json-out "$OUT/kcache-gpu.json" --markdown-out "$OUT/kcache-gpu.md" \
    $KCACHE_ARGS 2>&1 | tee -a "$LOG"
RC[kcache]=$?

say "4. throughput vs HF on the GPU (issue 23): $NUM_PROMPTS prompts, HF batch $HF_BATCH"
timeout -k 10 "$T_THROUGHPUT" $PY benchmarks/throughput.py --backend kvtier hf --num-prompts "$NUM_PROMPTS" --hf-batch-size "$HF_BATCH" \
    --json-out "$OUT/throughput-gpu.json" 2>&1 | tee -a "$LOG"
RC[throughput]=$?
if [ -f "$OUT/throughput-gpu.json" ]; then
    $PY - "$OUT/throughput-gpu.json" "$HF_BATCH" >"$OUT/throughput-gpu.md" <<'EOF'
import json
import sys

import torch

r = json.load(open(sys.argv[1]))
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
cell = lambda x: f"{x['elapsed_s']:.1f} s: {x['output_tokens_per_s']:.1f} output tok/s, {x['total_tokens_per_s']:.1f} total tok/s"  # noqa: E731
print(f"Workload: {r['workload']}; machine: {r['machine']}")
print()
print("| machine | kvtier | HF transformers | kvtier / HF |")
print("| --- | --- | --- | --- |")
print(f"| {gpu}; torch {torch.__version__}; HF batch {sys.argv[2]}, on the GPU | {cell(r['kvtier'])} | {cell(r['hf'])} | **{r['ratio_kvtier_over_hf']:.2f}x** |")
EOF
    cat "$OUT/throughput-gpu.md" | tee -a "$LOG"
fi

say "done"
# last, so that the reply's output tail holds them: the tables and each step's exit status (124: timed out)
[ -f "$OUT/kcache-gpu.md" ] && cat "$OUT/kcache-gpu.md"
[ -f "$OUT/throughput-gpu.md" ] && cat "$OUT/throughput-gpu.md"
for k in wheels torch kvtier kcache throughput; do echo "$k: rc ${RC[$k]}"; done | tee -a "$LOG"
ls -la "$OUT"
