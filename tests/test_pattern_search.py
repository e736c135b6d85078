"""`fastctx minference search` on the embedded model writes a loadable MInference file."""

import json

import torch

from fastctx import pattern_search
from fastctx.methods import minference as mi


def test_retrieval_prompt_fits_the_token_budget(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = pattern_search.kv_retrieval_prompt(tokenizer, 1000)
    assert 900 < len(ids) <= 1000
    assert "The value associated with the specified key is" in tokenizer.decode(ids)


def test_recall_of_a_dense_candidate_is_one():
    q, k = torch.randn(4, 128, 32), torch.randn(2, 128, 32)
    recalls = pattern_search.head_recalls(q, k, [mi.HeadPattern("vertical_and_slash", 1000, 1000),
                                                 mi.HeadPattern("stream_llm", 1, 8)], 32 ** -0.5)
    assert torch.allclose(recalls[0], torch.ones(4))
    assert (recalls[1] < 1).all()


def test_search_writes_a_file_minference_format_loads(model_dir, tmp_path):
    from fastctx.cli import main

    out = tmp_path / "patterns.json"
    assert main(["minference", "search", "--model", model_dir, "--out", str(out), "--tokens", "512"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 30 and all(len(layer) == 9 for layer in data)
    assert all(0 <= entry[3] <= 1 for layer in data for entry in layer.values())
    patterns = mi.load_pattern_config(out, num_layers=30, num_heads=9)
    assert {p.kind for layer in patterns for p in layer} <= set(mi.PATTERNS)
