"""How close a prefill method stays to dense attention, independent of any task.

The model runs teacher-forced on long natural text (the standard library's
sources, offline everywhere) twice through Hugging Face transformers: once
with dense attention, once with the fastctx method in every layer (the same
engine-free code the vLLM backend calls). Reported:

- ``attention_recall``: share of each head's true (dense) softmax mass that
  the method's index covers, averaged over sampled query rows, heads, layers;
- ``top1_agree``: next-token argmax agreement with dense on the last positions;
- ``kl_nats``: mean KL(dense || method) of the next-token distributions there;
- ``density``: the share of causal (query, key) pairs the method read.

With ``--decode-rows N`` the last N positions run as decode steps, one at a
time, through the configured decode method (its per-request state kept across
them, as in the engine); ``decode_*`` fields report those positions alone.

    python -m fastctx.eval.fidelity --method '{"attention": "minference"}' --tokens 4096 8191
    python -m fastctx.eval.fidelity --method '{"attention": "lserve", "decode": "lserve", ...}' --decode-rows 64
"""

from __future__ import annotations

import argparse
import json
import threading

import torch

from fastctx.config import FastctxConfig
from fastctx.core import AttentionRuntime, StepBatch
from fastctx.eval.texts import prompt_token_ids
from fastctx.kernels.attention import read_recall
from fastctx.kernels.dense import prefill_attention
from fastctx.kernels.paged import PagedKV, single_block_table
from fastctx.methods import ModelShape

_ATTN_NAME = "fastctx_fidelity"
_DECODE_REQUEST = "fidelity-decode"
_state = threading.local()
RECALL_ROWS = 256


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Hugging Face attention hook: dense, or the current fastctx runtime (a batch of one prefill, then
    the last ``decode_rows`` positions one decode step at a time)."""
    runtime: AttentionRuntime | None = getattr(_state, "runtime", None)
    q, k, v = query[0], key[0], value[0]
    if runtime is None:
        return prefill_attention(q, k, v, scale=scaling).transpose(0, 1)[None].contiguous(), None
    out = torch.empty_like(q)
    split = q.shape[1] - _state.decode_rows
    layer = module.layer_idx
    [read] = runtime.forward(StepBatch.single(q[:, :split], k[:, :split], v[:, :split]), layer, scaling,
                             out[:, :split].transpose(0, 1))
    if read.kind != "dense":
        _state.recalls.append(_recall(read, q[:, :split], k[:, :split], scaling, layer))
    kv, table = PagedKV.contiguous(k, v), single_block_table()
    for i in range(split, q.shape[1]):  # teacher-forced decode steps of one request
        batch = StepBatch(query=q[:, i:i + 1].transpose(0, 1), kv=kv, block_table=table, query_start=[0, 1],
                          seq_lens=[i + 1], num_decodes=1, request_ids=[_DECODE_REQUEST])
        [read] = runtime.forward(batch, layer, scaling, out[:, i:i + 1].transpose(0, 1))
        if read.kind != "dense":
            row = torch.tensor([i])
            _state.decode_recalls.append(float(read_recall(q, k, read, row, row, scaling).mean()))
    return out.transpose(0, 1)[None].contiguous(), None


def _recall(read, q, k, scale, layer) -> float:
    """Mean over sampled rows and heads of the dense softmax mass inside what the method read."""
    tq = q.shape[1]
    g = torch.Generator().manual_seed(layer)
    rows = torch.cat([torch.randperm(tq, generator=g)[:RECALL_ROWS], torch.arange(max(0, tq - 64), tq)])
    return float(read_recall(q, k, read, rows, rows + k.shape[1] - tq, scale).mean())


def load_model(model_dir: str):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(_ATTN_NAME, _attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=_ATTN_NAME)
    return model.eval()


@torch.inference_mode()
def _logits(model, ids: list[int], runtime: AttentionRuntime | None, last: int, decode_rows: int = 0) -> torch.Tensor:
    _state.runtime, _state.decode_rows = runtime, decode_rows
    _state.recalls, _state.decode_recalls = [], []
    try:
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -last:]
        return model.lm_head(hidden).float()
    finally:
        _state.runtime = None
        if runtime is not None:
            runtime.free([_DECODE_REQUEST])


def _agreement(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(dense || method) of next-token distributions."""
    logp, logq = torch.log_softmax(dense, -1), torch.log_softmax(sparse, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return round(float((dense.argmax(-1) == sparse.argmax(-1)).float().mean()), 4), round(float(kl.mean()), 5)


def compare(model, ids: list[int], section: dict, last: int = 512, decode_rows: int = 0) -> dict:
    """Fidelity of the method configured by ``section`` (a ``fastctx`` config) on ``ids``; with
    ``decode_rows``, the last that many positions run as decode steps through its decode method."""
    cfg = FastctxConfig.from_section(section)
    mc = model.config
    runtime = AttentionRuntime(cfg, ModelShape(mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads,
                                               mc.hidden_size // mc.num_attention_heads))
    if decode_rows and runtime.engine_decodes:
        raise ValueError(f"decode rows need a decode method; {section} keeps decodes on the engine")
    if not 0 <= decode_rows <= last:
        raise ValueError(f"decode rows ({decode_rows}) must be between 0 and the positions compared ({last})")
    dense = _logits(model, ids, None, last)
    sparse = _logits(model, ids, runtime, last, decode_rows)
    recalls, decode_recalls = list(_state.recalls), list(_state.decode_recalls)
    top1, kl = _agreement(dense, sparse)
    row = {"method": cfg.attention, "tokens": len(ids), "positions": last,
           "density": round(runtime.stats["prefill"].density, 4),
           "attention_recall": round(sum(recalls) / len(recalls), 4) if recalls else 1.0,
           "top1_agree": top1, "kl_nats": kl}
    if decode_rows:
        top1, kl = _agreement(dense[-decode_rows:], sparse[-decode_rows:])
        row.update({"decode_method": cfg.decode, "decode_rows": decode_rows,
                    "decode_density": round(runtime.stats["decode"].density, 4),
                    "decode_recall": round(sum(decode_recalls) / len(decode_recalls), 4) if decode_recalls else 1.0,
                    "decode_top1_agree": top1, "decode_kl_nats": kl})
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--method", action="append", required=True,
                        help="a fastctx config section as JSON; repeat to compare several")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--last", type=int, default=512, help="positions compared at the end of the text")
    parser.add_argument("--decode-rows", type=int, default=0,
                        help="run the last N positions as teacher-forced decode steps through the decode method")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from fastctx.default_model import require_default_model

    model_dir = args.model or str(require_default_model())
    model = load_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = []
    for n in args.tokens:
        ids = prompt_token_ids(tokenizer, n)
        for section in args.method:
            row = compare(model, ids, json.loads(section), args.last, args.decode_rows)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
