"""Speculative decoding in SGLang: no speculation, SGLang's own NGRAM, and fastctx's SPECTR with one
chain (speculative sampling), with k chains, and with Scylla choosing each step's shape within the
k-chain tree's size, on the same prompts, one server at a time.

Every server runs fastctx's ``dense`` backend (the one that verifies draft trees on a CPU);
SPECTR's chains come from the same n-gram draft distribution at every k, so k = 1 against k > 1
is speculative sampling against SpecTr. Prompts are copy tasks (a passage, "the same text again"
and the repeat's first 64 tokens; as ``spec_decode.py``), prefilled once before timing (radix
cache), so timed runs are decode. Per batch size, each server decodes the same batch of
different prompts at the same temperature. ``accept_len`` is SGLang's ``spec_accept_length``
(accepted drafts + 1 per verification), weighted by each request's verifications. Scylla's arms
(``d{depth}k{chains}``: steps run) come from the server's state report. The last line printed is
one JSON object.

    python benchmarks/sglang_spec_decode.py --quick     # batches 1 and 4, 48 new tokens, depth 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import requests

from fastctx.eval.server import SglangServer

from engines import machine  # noqa: E402  (benchmarks/ is on sys.path)


def arms(depth: int, chains: int) -> dict[str, list[str]]:
    spectr = ["--speculative-algorithm", "SPECTR", "--speculative-num-draft-tokens"]
    return {"nospec": [],
            "ngram": ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(1 + depth)],
            "sd": [*spectr, str(1 + depth), "--fastctx-spectr", '{"chains": 1}'],
            f"spectr_k{chains}": [*spectr, str(1 + chains * depth), "--fastctx-spectr", json.dumps({"chains": chains})],
            "scylla": [*spectr, str(1 + chains * depth), "--fastctx-spectr",
                       json.dumps({"chains": chains, "scylla": True})]}


def decode(url: str, prompts: list[list[int]], new_tokens: int, temperature: float) -> dict:
    body = {"input_ids": prompts, "sampling_params": {"temperature": temperature, "max_new_tokens": new_tokens,
                                                      "ignore_eos": True}}
    requests.post(url + "/generate", timeout=1800, json={**body, "sampling_params": {"max_new_tokens": 1}})
    started = time.perf_counter()
    reply = requests.post(url + "/generate", timeout=1800, json=body)
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    out = reply.json()
    tokens = sum(len(o["output_ids"]) for o in out)
    per_request = [o["meta_info"].get("spec_verify_ct", 0) for o in out]
    verifies = sum(per_request)
    accepted = sum(o["meta_info"].get("spec_accept_length", 0) * o["meta_info"].get("spec_verify_ct", 0)
                   for o in out)
    return {"tokens_per_s": round(tokens / seconds, 2), "verifications": per_request,
            "accept_len": round(accepted / verifies, 3) if verifies else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1,4; 48 new tokens")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--depth", type=int, default=3, help="draft tokens per chain")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="passage tokens per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new_tokens = "1,4", 48
    from spec_decode import copy_prompts  # (benchmarks/ is on sys.path)
    from transformers import AutoTokenizer

    from fastctx.default_model import require_default_model

    model = str(require_default_model())
    batches = [int(b) for b in args.batches.split(",")]
    prompts = copy_prompts(AutoTokenizer.from_pretrained(model), max(batches), args.context)
    logs = Path(tempfile.mkdtemp(prefix="sglang_spec_"))
    rows: dict[str, dict[int, dict]] = {}
    scylla_arms = None
    for name, extra in arms(args.depth, args.chains).items():
        server = SglangServer(model, {"attention": "dense"}, logs / f"{name}.log", dtype=args.dtype,
                              max_model_len=args.context + 256 + args.new_tokens, extra_args=extra)
        url = server.start(timeout=600)
        try:
            rows[name] = {b: decode(url, prompts[:b], args.new_tokens, args.temperature) for b in batches}
            if name == "scylla":
                states = requests.get(url + "/server_info", timeout=30).json()["internal_states"]
                scylla_arms = [row["arms"] for state in states for row in state.get("fastctx_spectr", [])]
        finally:
            server.stop()
        print(name, rows[name], flush=True)
    spectr = f"spectr_k{args.chains}"
    result = {"engine": "sglang", "depth": args.depth, "chains": args.chains, "temperature": args.temperature,
              "new_tokens": args.new_tokens, **machine(), "rows": rows, "scylla_arms": scylla_arms}
    for b in batches:
        sd, many = rows["sd"][b]["accept_len"], rows[spectr][b]["accept_len"]
        result[f"b{b}"] = {
            "accept_len_sd": sd, f"accept_len_spectr_k{args.chains}": many,
            "accept_len_ngram": rows["ngram"][b]["accept_len"], "accept_len_scylla": rows["scylla"][b]["accept_len"],
            f"tokens_per_s_ratio_scylla_vs_spectr_k{args.chains}": round(rows["scylla"][b]["tokens_per_s"]
                                                                        / rows[spectr][b]["tokens_per_s"], 3),
            f"accept_len_ratio_spectr_k{args.chains}_vs_sd": round(many / sd, 3) if sd and many else None,
            **{f"tokens_per_s_ratio_{name}_vs_nospec": round(rows[name][b]["tokens_per_s"]
                                                             / rows["nospec"][b]["tokens_per_s"], 3)
               for name in rows if name != "nospec"}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
