"""Which KV heads can be LServe streaming heads: a DuoAttention-style ranking for any local model.

Runs the model (Hugging Face transformers, float32) on a key-value retrieval
sample and a natural-text sample and, for every layer and KV head, measures the
share of the heads' softmax mass that a sink + local window keeps: on the
retrieval sample over its last rows (the question, which must reach a key far
back), on the natural text over rows sampled from its second half. A head's
*full-attention score* is one minus that share, averaged over its query heads
and the two samples: LServe makes the lowest-scored ``streaming_fraction`` of
heads streaming. DuoAttention instead trains a gate per head on synthetic
passkey data; this ranking needs no training and runs in about ten seconds on
SmolLM2.

    fastctx lserve calibrate --model DIR --out heads.json [--tokens 2048] [--sink 128 --local 256]
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastctx.eval.texts import prompt_token_ids
from fastctx.kernels.attention import Read, read_recall
from fastctx.pattern_search import SEARCH_ROWS, kv_retrieval_prompt, run_layers

QUESTION_ROWS = 32  # the retrieval sample's last rows: its question


def window_recalls(q: torch.Tensor, k: torch.Tensor, sink: int, local: int, scaling: float | None,
                   rows: torch.Tensor) -> torch.Tensor:
    """``[Hkv]``: the window's share of the softmax mass of query ``rows`` (at their own positions),
    averaged over each KV head's query heads."""
    recall = read_recall(q, k, Read.window(sink, local), rows, rows, scaling)
    return recall.view(k.shape[0], -1).mean(-1)


def sample_rows(num_tokens: int, question: bool) -> torch.Tensor:
    """The question's rows, or up to SEARCH_ROWS rows sampled from the second half."""
    if question:
        return torch.arange(num_tokens - QUESTION_ROWS, num_tokens)
    rows = torch.arange(num_tokens // 2, num_tokens)
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:SEARCH_ROWS]].sort().values


def calibrate(model_dir: str, num_tokens: int = 2048, sink: int = 128, local: int = 256, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    if num_tokens <= 2 * (sink + local):
        raise ValueError(f"--tokens {num_tokens} must exceed twice sink + local = {2 * (sink + local)}, or every "
                         "query row scored would see only its window")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [kv_retrieval_prompt(tokenizer, num_tokens, seed), prompt_token_ids(tokenizer, num_tokens)]
    kept: dict[int, list[torch.Tensor]] = {}

    def on_layer(layer, q, k, scaling):
        question = len(kept.get(layer, [])) == 0  # samples run in order: retrieval first
        rows = sample_rows(q.shape[1], question)
        kept.setdefault(layer, []).append(window_recalls(q, k, sink, local, scaling, rows))

    run_layers(model_dir, samples, on_layer)
    scores = [(1 - torch.stack(kept[i]).mean(0)).tolist() for i in range(len(kept))]
    return {"method": "lserve", "model": Path(model_dir).name, "num_layers": len(scores),
            "num_kv_heads": len(scores[0]), "tokens": num_tokens, "sink": sink, "local": local,
            "score": "1 - share of softmax mass a sink + local window keeps, mean of a retrieval sample's "
                     "question rows and natural-text rows (higher: needs full attention)",
            "scores": [[round(x, 5) for x in row] for row in scores]}
