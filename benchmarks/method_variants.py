"""Where fastctx's index builders differ from the original implementations, measured.

SmolLM2 runs once through Hugging Face transformers on natural text (the whole
text as one chunk); every layer's q/k are kept. On them, each pair below builds
both variants from the same estimate and reports the density each reads and its
attention recall (dense softmax mass inside the index, over sampled query rows),
averaged over layers and heads:

1. MInference's vertical-slash index converter (``convert_vertical_slash_indexes``,
   64x64): merged diagonal ranges grow in 64-key steps, and a diagonal only partly
   visible to a query block reads keys [0, 64). fastctx: exact ranges.
2. MInference's block-sparse heads: its kernel call hard-codes top-k 100 blocks;
   fastctx reads the head's own budget (its pattern's ``v``).
3. FlexPrefill's reference code (``token_count`` selection): it divides its token
   count by 128 whatever the block size; fastctx divides by the block size.
4. FlexPrefill's reference code groups diagonals into blocks counted from the
   last query's position; fastctx groups diagonal offsets from 0 (aligned with
   the block grid it reads).

    python benchmarks/method_variants.py --tokens 8000
    python benchmarks/method_variants.py --quick        # 2100 tokens
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from fastctx.kernels.estimation import last_query_sums, pool_blocks
from fastctx.kernels.sparse import SparseIndex, block_mask_index, rows_mask, vertical_slash_index
from fastctx.methods import flexprefill as fp
from fastctx.methods import minference as mi

ROWS = 256


def capture(model_dir: str, tokens: int):
    """Per layer: (q [H, T, D], k [Hkv, T, D], scale) of one prefill of ``tokens`` tokens of text."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from fastctx.eval.texts import prompt_token_ids
    from fastctx.kernels.dense import prefill_attention

    layers = {}

    def keep(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = query[0], key[0], value[0]
        layers[module.layer_idx] = (q.clone(), k.clone(), scaling)
        return prefill_attention(q, k, v, scale=scaling).transpose(0, 1)[None].contiguous(), None

    AttentionInterface.register("fastctx_variants", keep)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="fastctx_variants")
    ids = prompt_token_ids(AutoTokenizer.from_pretrained(model_dir), tokens)
    with torch.inference_mode():
        model.model(torch.tensor([ids]))
    return [layers[i] for i in range(len(layers))]


def minference_converter_mask(v_idx: torch.Tensor, s_idx: torch.Tensor, tokens: int, block: int = 64):
    """``[H, R, T]`` bool: the keys MInference's 64x64 converter has each query block read (before the
    kernel's causal mask). Per block, diagonals (descending offsets) each span the 64 keys ending at
    their key in the block's last row, clamped to [0, 64) when partly visible; a diagonal ending
    within 64 keys after the current range grows it by a whole 64; columns outside ranges stay."""
    heads, blocks = v_idx.shape[0], -(-tokens // block)
    end_m = (torch.arange(blocks) + 1) * block  # [R]
    offsets = s_idx.long().sort(1, descending=True).values
    width = int(end_m[-1]) + 2 * block + 1  # merged ranges can grow past the last block's end
    diff = torch.zeros(heads, blocks, width, dtype=torch.int32)
    start = torch.full((heads, blocks), -1, dtype=torch.long)
    end = torch.full((heads, blocks), -1, dtype=torch.long)

    def close(which):
        h, r = which.nonzero(as_tuple=True)
        diff[h, r, start[h, r]] += 1
        diff[h, r, end[h, r].clamp(max=width - 1)] -= 1
    for j in range(offsets.shape[1]):
        s = offsets[:, j:j + 1]
        valid = s < end_m[None]
        e = torch.clamp(end_m[None] - s, min=block)
        opened = end >= 0
        new = valid & (~opened | (e > end + block))
        grow = valid & opened & (e > end) & (e <= end + block)
        close(new & opened)
        start = torch.where(new, e - block, start)
        end = torch.where(new, e, torch.where(grow, end + block, end))
    close(end >= 0)
    mask = diff.cumsum(2)[..., :tokens] > 0
    verts = v_idx.long().clamp(0, tokens - 1)[:, None, :].expand(-1, blocks, -1)
    cols = torch.zeros_like(mask).scatter_(2, verts, True) & (torch.arange(tokens)[None, None] < end_m[None, :, None])
    return mask | cols


def index_block_mask(index: SparseIndex) -> torch.Tensor:
    """``[H, R, T]`` bool: the keys each query block of ``index`` lists (no causal cut)."""
    last = torch.full((index.num_blocks,), index.num_keys - 1)
    return rows_mask(index.ranges, index.cols, last, index.num_keys)


def flexprefill_vs_mask(q, k, params, scale, divisor: int, from_last_query: bool) -> torch.Tensor:
    """FlexPrefill's vertical-slash block mask with ``token_count`` selection: top blocks as many as
    (tokens reaching gamma) // divisor + 1, diagonals grouped from offset 0 or from the last query."""
    heads, q_len, _ = q.shape
    b, tk = params.block_size, k.shape[1]
    nqb, nkb = -(-q_len // b), -(-tk // b)
    n = min(b, q_len)
    vertical, slash = (x / n for x in last_query_sums(q, k, 0, n, scale))
    min_blocks = max(1, math.ceil(params.min_budget / b))
    n_v = (fp._count_to_mass(vertical, params.gamma) // divisor + 1).clamp(min_blocks, nkb)
    n_s = (fp._count_to_mass(slash, params.gamma) // divisor + 1).clamp(min_blocks, nkb)
    vertical_b = pool_blocks(vertical[..., None], b, "sum")[..., 0]
    if from_last_query:  # pooled over key positions of the last query's row, then read as offsets
        slash_b = pool_blocks(slash.flip(-1)[..., None], b, "sum")[..., 0].flip(-1)
    else:
        slash_b = pool_blocks(slash[..., None], b, "sum")[..., 0]
    vertical_b[:, 0] = slash_b[:, 0] = float("inf")
    rank_v = vertical_b.argsort(-1, descending=True).argsort(-1)
    rank_s = slash_b.argsort(-1, descending=True).argsort(-1)
    first = torch.arange(nqb) * b
    diag = torch.clamp(first + b - 1, max=q_len - 1) // b
    kb = torch.arange(nkb)
    visible = kb[None] <= diag[:, None]
    offset = diag[:, None] - kb[None]
    take_s = rank_s.gather(1, offset.clamp(min=0).flatten().expand(heads, -1)).view(heads, nqb, nkb)
    mask = ((rank_v < n_v[:, None])[:, None, :] & visible[None]) | ((take_s < n_s[:, None, None]) & (offset >= 0)[None])
    mask[:, torch.arange(nqb), first // b] = True
    return mask & visible[None]


def measure(q, k, scale, block_mask: torch.Tensor, block: int = 64) -> tuple[float, float]:
    """(density, attention recall) of query blocks of ``block`` rows reading ``block_mask`` ``[H, R, T]``."""
    heads, tokens = q.shape[0], q.shape[1]
    pos = torch.arange(tokens)
    counts = block_mask.int().cumsum(2)  # keys read up to each position, per block
    read = counts[:, pos // block, pos].sum()
    causal = heads * tokens * (tokens + 1) // 2
    rows = torch.randperm(tokens, generator=torch.Generator().manual_seed(tokens))[:ROWS]
    group = heads // k.shape[0]
    scores = torch.einsum("htd,hsd->hts", q[:, rows].float(), k.float().repeat_interleave(group, 0)) * scale
    visible = pos[None] <= rows[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    recall = (probs * block_mask[:, rows // block]).sum(-1).mean()
    return float(read) / causal, float(recall)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8100,
                        help="not a multiple of FlexPrefill's block, so variant 4 can differ")
    parser.add_argument("--quick", action="store_true", help="2100 tokens")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = 2100
    from fastctx.default_model import require_default_model

    layers = capture(args.model or str(require_default_model()), args.tokens)
    pairs = {
        "vs_converter": ("fastctx exact ranges", "MInference 64x64 converter"),
        "block_sparse_topk": ("fastctx: the head's budget (12 blocks)", "MInference: top-100 blocks"),
        "flexprefill_divisor": ("fastctx: token count // block (64)", "reference: token count // 128"),
        "flexprefill_diagonals": ("fastctx: offsets grouped from 0", "reference: grouped from the last query"),
    }
    sums = {name: [[0.0, 0.0], [0.0, 0.0]] for name in pairs}
    fx = fp.FlexPrefillParams(gamma=0.9, min_budget=512, block_size=64, block_selection="token_count")
    for q, k, scale in layers:
        q_len = q.shape[1]
        v_idx, s_idx = mi.vertical_slash(q, k, 512, 1024, scale=scale)
        # The emulation of FlexPrefill's vertical-slash heads must be fastctx's own selection.
        mask, query_aware = fp.block_mask(q, k, fx, scale=scale)
        assert torch.equal(flexprefill_vs_mask(q, k, fx, scale, 64, False)[~query_aware], mask[~query_aware])
        masks = {
            "vs_converter": (index_block_mask(vertical_slash_index(v_idx, s_idx, q_len, 0, 64)),
                             minference_converter_mask(v_idx, s_idx, q_len)),
            "block_sparse_topk": tuple(index_block_mask(block_mask_index(mi.block_sparse_mask(q, k, topk), 64, q_len))
                                       for topk in (12, 100)),
            "flexprefill_divisor": tuple(
                index_block_mask(block_mask_index(flexprefill_vs_mask(q, k, fx, scale, d, False), 64, q_len))
                for d in (64, 128)),
            "flexprefill_diagonals": tuple(
                index_block_mask(block_mask_index(flexprefill_vs_mask(q, k, fx, scale, 64, grouped), 64, q_len))
                for grouped in (False, True)),
        }
        for name, pair in masks.items():
            for i, mask in enumerate(pair):
                density, recall = measure(q, k, scale, mask)
                sums[name][i][0] += density / len(layers)
                sums[name][i][1] += recall / len(layers)
    result = {"tokens": args.tokens, "layers": len(layers)}
    for name, (ours, theirs) in pairs.items():
        (d0, r0), (d1, r1) = sums[name]
        result[name] = {"fastctx": {"what": ours, "density": round(d0, 4), "recall": round(r0, 4)},
                        "original": {"what": theirs, "density": round(d1, 4), "recall": round(r1, 4)}}
        print(f"{name}: {ours}: density {d0:.4f} recall {r0:.4f} | {theirs}: density {d1:.4f} recall {r1:.4f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
