"""vLLM's offline ``LLM.generate`` on a given workload, run inside .venv-vllm (benchmarks/peers/setup_vllm.sh).

benchmarks/throughput.py writes the request (model folder, token ids, output lengths, engine settings) as JSON and
starts this script with the peer's Python and vLLM's CPU environment (``peers/vllm_env.py``),
``vllm_offline.py REQUEST.json RESULT.json``; it writes as JSON the elapsed time of ``generate`` alone (engine start-up
excluded, as kvtier's side excludes it), the tokens produced and vLLM's version (the caller samples the process tree's
memory). Greedy, ``ignore_eos``, no tokenizer: vLLM sees the very same token ids.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    req = json.loads(open(sys.argv[1]).read())
    settings = req["settings"]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=req["model"], skip_tokenizer_init=True, dtype=settings["dtype"], max_model_len=settings["max_model_len"],
              max_num_seqs=settings["max_num_seqs"], max_num_batched_tokens=settings["max_num_batched_tokens"],
              enable_prefix_caching=settings["enable_prefix_caching"], seed=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in req["output_lens"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    with open(sys.argv[2], "w") as f:
        json.dump({"elapsed_s": elapsed, "output_tokens": sum(tokens), "requests": len(tokens), "version": vllm.__version__, "settings": settings}, f)


if __name__ == "__main__":
    main()
