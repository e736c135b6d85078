"""MInference's offline, kernel-aware head-pattern search, for any local model.

Runs the model (Hugging Face transformers, float32) once on one synthetic
key-value retrieval sample, as MInference does, and for every head measures
the *attention recall* of each candidate pattern: the share of the head's
true softmax mass (query rows in the second half of the sample) that the
pattern's index covers. Candidates have comparable cost (density at the
sample length); each head gets the one with the best recall. The result is
written in MInference's own JSON format (a list over layers of
``{head: [pattern, v, s, recall]}``), so MInference's published files and
searched ones are interchangeable.

    fastctx minference search --model DIR --out patterns.json [--tokens 4096] [--budget 0.1]
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import torch

from fastctx.eval.texts import token_ids
from fastctx.kernels.sparse import attention_recall
from fastctx.methods import minference as mi

SEARCH_ROWS = 256


def kv_retrieval_prompt(tokenizer, num_tokens: int, seed: int = 0) -> list[int]:
    """SCBench/InfiniteBench-style retrieval: a JSON of random UUID pairs, then one key's question."""
    rng = random.Random(seed)
    new_uuid = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
    pairs, ids = [], []
    head = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
    while True:
        pairs.append((new_uuid(), new_uuid()))
        key = pairs[len(pairs) // 2][0]
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        text = f'{head}{body}}}\n\nKey: "{key}"\nThe value associated with the specified key is: '
        candidate = token_ids(tokenizer, text)
        if len(candidate) > num_tokens:
            return ids or candidate[:num_tokens]
        ids = candidate


DEFAULT_BUDGET = 0.1


def candidates(num_tokens: int, budget_share: float = DEFAULT_BUDGET) -> list[mi.HeadPattern]:
    """Patterns of comparable cost at the sample length: each reads about ``budget_share``
    of a query's keys (for vertical-slash: columns + diagonals)."""
    if not 0 < budget_share <= 1:
        raise ValueError(f"budget share {budget_share} must be in (0, 1] (default {DEFAULT_BUDGET})")
    budget = max(64, int(num_tokens * budget_share))
    return [
        mi.HeadPattern("vertical_and_slash", 30, budget),
        mi.HeadPattern("vertical_and_slash", budget // 4, budget * 3 // 4),
        mi.HeadPattern("vertical_and_slash", budget // 2, budget // 2),
        mi.HeadPattern("vertical_and_slash", budget, 100),
        mi.HeadPattern("stream_llm", 64, budget),
        mi.HeadPattern("block_sparse", max(1, budget // 64), 0),
    ]


def head_recalls(q, k, patterns: list[mi.HeadPattern], scale: float) -> torch.Tensor:
    """``[len(patterns), H]``: attention recall of each pattern for each head of one layer."""
    heads, tq, _ = q.shape
    rows = torch.arange(tq // 2, tq)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:SEARCH_ROWS]]
    return torch.stack([attention_recall(q, k, index=mi.layer_index([p] * heads, q, k), rows=rows, scale=scale)
                        for p in patterns])


def run_layers(model_dir: str, samples: list[list[int]], on_layer) -> None:
    """Runs the model (Hugging Face transformers, float32) on each sample, calling
    ``on_layer(layer_index, q, k, scaling)`` with each layer's ``[H, T, D]`` queries and ``[Hkv, T, D]``
    keys (after RoPE) before computing its dense attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from fastctx.kernels.dense import prefill_attention

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = query[0], key[0], value[0]
        on_layer(module.layer_idx, q, k, scaling)
        return prefill_attention(q, k, v, scale=scaling).transpose(0, 1)[None].contiguous(), None

    AttentionInterface.register("fastctx_capture", capture)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="fastctx_capture")
    with torch.inference_mode():
        for ids in samples:
            model.model(torch.tensor([ids]))


def search(model_dir: str, num_tokens: int = 4096, seed: int = 0,
           budget_share: float = DEFAULT_BUDGET) -> list[dict]:
    from transformers import AutoTokenizer

    ids = kv_retrieval_prompt(AutoTokenizer.from_pretrained(model_dir), num_tokens, seed)
    patterns = candidates(len(ids), budget_share)
    layers: dict[int, dict] = {}

    def best_patterns(layer, q, k, scaling):
        recall = head_recalls(q, k, patterns, scaling)
        best = recall.argmax(0)
        layers[layer] = {str(h): [patterns[b].kind, patterns[b].v, patterns[b].s, round(float(recall[b, h]), 4)]
                         for h, b in enumerate(best.tolist())}

    run_layers(model_dir, [ids], best_patterns)
    return [layers[i] for i in range(len(layers))]


def write(config, out: str | Path) -> Path:
    """Writes a JSON file atomically (a crash leaves the old file or none)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(out)
    return out
