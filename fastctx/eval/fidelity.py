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

    python -m fastctx.eval.fidelity --method '{"attention": "minference"}' --tokens 4096 8191
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
from fastctx.methods import ModelShape

_ATTN_NAME = "fastctx_fidelity"
_state = threading.local()
RECALL_ROWS = 256


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Hugging Face attention hook: dense, or the current fastctx runtime (a batch of one prefill)."""
    runtime: AttentionRuntime | None = getattr(_state, "runtime", None)
    q, k, v = query[0], key[0], value[0]
    if runtime is None:
        out = prefill_attention(q, k, v, scale=scaling)
    else:
        out = torch.empty_like(q)
        [read] = runtime.forward(StepBatch.single(q, k, v), module.layer_idx, scaling, out.transpose(0, 1))
        if read.kind != "dense":
            _state.recalls.append(_recall(read, q, k, scaling, module.layer_idx))
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
def _logits(model, ids: list[int], runtime: AttentionRuntime | None, last: int) -> torch.Tensor:
    _state.runtime = runtime
    _state.recalls = []
    try:
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -last:]
        return model.lm_head(hidden).float()
    finally:
        _state.runtime = None


def compare(model, ids: list[int], section: dict, last: int = 512) -> dict:
    """Fidelity of the method configured by ``section`` (a ``fastctx`` config) on ``ids``."""
    cfg = FastctxConfig.from_section(section)
    mc = model.config
    runtime = AttentionRuntime(cfg, ModelShape(mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads,
                                               mc.hidden_size // mc.num_attention_heads))
    dense = _logits(model, ids, None, last)
    sparse = _logits(model, ids, runtime, last)
    recalls = list(_state.recalls)
    logp, logq = torch.log_softmax(dense, -1), torch.log_softmax(sparse, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"method": cfg.attention, "tokens": len(ids), "positions": last,
            "density": round(runtime.stats["prefill"].density, 4),
            "attention_recall": round(sum(recalls) / len(recalls), 4) if recalls else 1.0,
            "top1_agree": round(float((dense.argmax(-1) == sparse.argmax(-1)).float().mean()), 4),
            "kl_nats": round(float(kl.mean()), 5)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--method", action="append", required=True,
                        help="a fastctx config section as JSON; repeat to compare several")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--last", type=int, default=512, help="positions compared at the end of the text")
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
            row = compare(model, ids, json.loads(section), args.last)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
