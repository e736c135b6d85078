"""How often K-SEQ accepts the first draft token, for draft distributions and chain counts.

No sampling noise in the acceptance: the target samples each copy-task prompt's continuation once
(temperature 1, as ``spec_decode.py``), then at every sampled position the target's distribution
(teacher-forced) and each draft's distribution over the same context give K-SEQ's acceptance
probability ``1 - (1 - beta(rho*))^k`` exactly (``fastctx.specdec.kseq``); the table is its mean.
It ranks draft distributions without the variance of whole generations, where whether the model
keeps copying swings accepted lengths more than the draft does.

Beside K-SEQ, ``bound k=4``: no verification of 4 independent drafts can accept more than
``sum_x min(p(x), 1 - (1 - q(x))^4)`` (the output is x only if some draft is x), so K-SEQ's
distance to it is what a better verifier could still gain on that draft; the rest is the draft's.
Drafts: n-gram distributions (min_n, max_n, interpolation) and ``stream``, the target over its
first 4 and last 64 tokens' KV (``spec_decode.py --engine hf --draft stream``). ``streaks``: the
default n-gram draft's one-chain acceptance after a position where it was above 0.5 and after one
where it was not (whether acceptance runs in streaks, which a policy choosing one length per step
for a batch cannot see).

    python benchmarks/draft_acceptance.py                 # 6 prompts x 64 tokens
    python benchmarks/draft_acceptance.py --quick         # 2 prompts x 32 tokens
    python benchmarks/draft_acceptance.py --prompts 12 --new-tokens 96
    python benchmarks/draft_acceptance.py --drafts interp0.5_1_4 --prompts 8 --new-tokens 128   # one draft

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from spec_decode import copy_prompts  # noqa: E402

from fastctx.specdec.hf_loop import ModelDraft, NgramDraft
from fastctx.specdec.kseq import acceptance, beta, optimal_rho

from engines import machine  # noqa: E402  (benchmarks/ is on sys.path)

# name -> (min_n, max_n, interpolation), or None for the stream draft
DRAFTS = {"longest_2_4": (2, 4, 1.0), "interp0.5_2_4": (2, 4, 0.5), "interp0.7_2_4": (2, 4, 0.7),
          "interp0.5_1_4": (1, 4, 0.5), "interp0.3_1_4": (1, 4, 0.3), "interp0.5_1_6": (1, 6, 0.5),
          "stream_4_64": None}
CHAINS = (1, 2, 4)
STREAM_SINK, STREAM_WINDOW = 4, 64
STREAK_DRAFT = "interp0.5_1_4"  # vLLM's default n-gram draft


def draft_dist(draft, context: list[int]) -> torch.Tensor:
    """The draft's distribution of the token after ``context``, ``[1, V]``."""
    if isinstance(draft, NgramDraft):
        draft._index(context)
        return draft.dist(context[-draft.max_n:])[None]
    # one draft token from a single chain, kept: the draft's cache then holds the context, as in decoding
    _, q = draft.propose(context, 1, 1, 1.0, torch.Generator().manual_seed(0))
    draft.accept(0, 0, 1)
    return q[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--context", type=int, default=512, help="passage tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="2 prompts x 32 tokens")
    ap.add_argument("--drafts", default=",".join(DRAFTS), help="comma-separated, of: " + ", ".join(DRAFTS))
    args = ap.parse_args()
    chosen = {name: DRAFTS[name] for name in args.drafts.split(",") if name in DRAFTS}
    if len(chosen) != len(args.drafts.split(",")):
        ap.error(f"--drafts {args.drafts}: name drafts among {', '.join(DRAFTS)}")
    if args.quick:
        args.prompts, args.new_tokens = 2, 32

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastctx.default_model import require_default_model

    torch.set_num_threads(args.threads)
    model_dir = str(require_default_model())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    sums = {(name, k): 0.0 for name in chosen for k in CHAINS}
    bound = dict.fromkeys(chosen, 0.0)
    streaks = {True: [], False: []}  # previous position's one-chain acceptance > 0.5 -> this position's
    positions = 0
    for i, prompt in enumerate(copy_prompts(tok, args.prompts, args.context)):
        torch.manual_seed(i)
        with torch.inference_mode():
            seq = model.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.new_tokens)[0].tolist()
            logits = model(torch.tensor([seq])).logits[0].double()
            drafts = {name: NgramDraft(vocab, *knobs) if knobs else ModelDraft(model, STREAM_SINK, STREAM_WINDOW)
                      for name, knobs in chosen.items()}
            previous = None
            for t in range(len(prompt), len(seq)):
                target = torch.softmax(logits[t - 1], -1)[None]
                for name, draft in drafts.items():
                    q = draft_dist(draft, seq[:t]).to(target.dtype)
                    accepts = {k: float(acceptance(beta(q, target, optimal_rho(q, target, k)), k)) for k in CHAINS}
                    for k in CHAINS:
                        sums[name, k] += accepts[k]
                    bound[name] += float(torch.minimum(target, 1 - (1 - q) ** 4).sum())
                    if name == STREAK_DRAFT:
                        if previous is not None:
                            streaks[previous > 0.5].append(accepts[1])
                        previous = accepts[1]
                positions += 1
        print(f"prompt {i}: {positions} positions", flush=True)

    mean = {name: {k: sums[name, k] / positions for k in CHAINS} for name in chosen}
    bound = {name: value / positions for name, value in bound.items()}
    streak = {"after_above_half": sum(streaks[True]) / max(len(streaks[True]), 1),
              "positions_after_above_half": len(streaks[True]),
              "otherwise": sum(streaks[False]) / max(len(streaks[False]), 1),
              "positions_otherwise": len(streaks[False])} if STREAK_DRAFT in chosen else None
    print(f"\n{'draft (min_n, max_n, interpolation)':36s} " + " ".join(f"{'k=' + str(k):>7s}" for k in CHAINS)
          + f" {'k4 / k1':>8s} {'bound k=4':>9s}")
    for name, knobs in chosen.items():
        print(f"{name + ' ' + str(knobs or ''):36s} " + " ".join(f"{mean[name][k]:7.3f}" for k in CHAINS)
              + f" {mean[name][4] / mean[name][1]:8.3f} {bound[name]:9.3f}")
    if streak:
        print(f"{STREAK_DRAFT}, one chain: {streak['after_above_half']:.3f} after a position it accepted with > 0.5 "
              f"({streak['positions_after_above_half']}), {streak['otherwise']:.3f} otherwise "
              f"({streak['positions_otherwise']})")
    print(json.dumps({"prompts": args.prompts, "context": args.context, "new_tokens": args.new_tokens,
                      "positions": positions, "temperature": 1.0, "machine": machine(),
                      "first_draft_acceptance": mean, "bound_k4": bound, "streaks": streak,
                      "k4_over_k1": {name: mean[name][4] / mean[name][1] for name in chosen}}))


if __name__ == "__main__":
    main()
