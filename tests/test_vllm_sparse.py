"""Sparse methods inside vLLM: exact at full budgets, sparse and reported otherwise, in both phases."""

from __future__ import annotations

import pytest

from tests.conftest import _make_llm, density
from tests.method_sections import DECODE_METHODS, FULL_BUDGET, PROMPTS, SPARSE, TEXT

pytestmark = pytest.mark.engine

def _run(llm, max_tokens=20):
    from vllm import SamplingParams

    density(llm, "prefill")  # reset
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def engines(vllm_available, model_dir):
    made = {}

    def get(kind, name):
        if (kind, name) not in made:
            section = (FULL_BUDGET if kind == "full" else SPARSE)[name]
            made[(kind, name)] = _make_llm(model_dir, attention_config={"backend": "CUSTOM"},
                                           additional_config={"fastctx": section})
        return made[(kind, name)]
    yield get
    made.clear()


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_equals_dense(engines, dense_llm, name):
    from vllm import SamplingParams

    want = [list(o.outputs[0].token_ids)
            for o in dense_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))]
    llm = engines("full", name)
    if name in DECODE_METHODS:
        density(llm, "decode")  # reset
    assert _run(llm) == want
    prefill = density(llm, "prefill", reset=False)
    assert prefill["density"] == 1.0
    if name in DECODE_METHODS:  # every decode through the method's reads (index reads for lserve)
        decode = density(llm, "decode", reset=False)
        assert decode["dense_chunks"] + decode["sparse_chunks"] == 30 * 19 * len(PROMPTS)
        assert decode["density"] == 1.0
    if name != "lserve":  # (lserve's prefill windows hold every key here, so it reads densely)
        assert prefill["sparse_chunks"] > 0


def test_small_budgets_are_sparse_and_reported(engines):
    llm = engines("sparse", "minference")
    got = _run(llm)
    assert all(len(tokens) == 20 for tokens in got)
    prefill = density(llm, "prefill", reset=False)
    assert prefill["sparse_chunks"] > 0 and 0.05 < prefill["density"] < 0.6
    assert prefill["config"]["minference"]["s_size"] == 100


def _both_phases(engines, name) -> tuple[dict, dict]:
    """Runs the small-budget engine of a method with a decode phase; its prefill and decode counts."""
    llm = engines("sparse", name)
    density(llm, "decode")  # reset
    assert all(len(tokens) == 24 for tokens in _run(llm, max_tokens=24))
    prefill, decode = density(llm, "prefill", reset=False), density(llm, "decode", reset=False)
    assert prefill["method"] == decode["method"] == name
    assert decode["dense_chunks"] > 0 and decode["sparse_chunks"] > 0  # the short prompt reads all
    return prefill, decode


def test_streaming_runs_sparse_in_both_phases_and_reports_decode_density(engines):
    prefill, decode = _both_phases(engines, "streaming")
    # Decodes at ~1000-1300 tokens of context read 16 + 256 keys each.
    assert 0.15 < decode["density"] < 0.5
    assert prefill["density"] < 0.6


def test_lserve_selects_pages_in_decode_and_streams_half_the_heads(engines):
    prefill, decode = _both_phases(engines, "lserve")
    # ~1000-1300 tokens of context: dense heads read 256 tokens plus the newest page, streaming
    # heads the sinks and the pages holding the last 64 keys.
    assert 0.05 < decode["density"] < 0.4
    assert prefill["sparse_chunks"] > 0 and prefill["density"] < 0.9
    # Page bounds go with their requests: vLLM reports finished requests with the next step.
    llm = engines("sparse", "lserve")
    held = set(llm.collective_rpc("fastctx_live_requests")[0])
    _run(llm, max_tokens=2)
    assert not held & set(llm.collective_rpc("fastctx_live_requests")[0])


def test_layers_vllm_keeps_say_why_and_the_rest_stay_exact(vllm_available, model_dir):
    """Sliding-window layers run vLLM's kernel (reason logged); fastctx computes the others, and the
    tokens equal a stock engine with the same model."""
    from vllm import SamplingParams

    overrides = {"layer_types": ["sliding_attention", "full_attention"] * 15, "sliding_window": 128}
    params = SamplingParams(temperature=0, max_tokens=16)
    prompt = [TEXT[60000:61500]]
    stock = _make_llm(model_dir, hf_overrides=overrides)
    want = [list(o.outputs[0].token_ids) for o in stock.generate(prompt, params)]
    del stock
    mixed = _make_llm(model_dir, hf_overrides=overrides, attention_config={"backend": "CUSTOM"},
                      additional_config={"fastctx": {"attention": "dense", "decode": "dense"}})
    assert [list(o.outputs[0].token_ids) for o in mixed.generate(prompt, params)] == want
    decode = density(mixed, "decode")
    assert decode["dense_chunks"] == 15 * 15  # 15 fastctx layers x 15 decode steps


def test_every_layer_falling_back_stops_startup(vllm_available, model_dir):
    overrides = {"layer_types": ["sliding_attention"] * 30, "sliding_window": 128}
    with pytest.raises(Exception, match="every attention layer would run vLLM's own kernel.*sliding window"):
        _make_llm(model_dir, hf_overrides=overrides, attention_config={"backend": "CUSTOM"},
                  additional_config={"fastctx": {"attention": "dense"}})
