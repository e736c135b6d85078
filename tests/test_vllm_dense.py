"""The dense methods must reproduce stock vLLM's greedy tokens exactly, in prefill and in decode.

Each scenario runs on a stock engine and on a fastctx engine with
``{"attention": "dense", "decode": "dense"}`` (every prefill and every decode through
fastctx, K/V read in place from vLLM's paged cache) with the same settings (fp32,
chunked prefill at 256 tokens, prefix caching on).
"""

from __future__ import annotations

import pytest

from fastctx.eval.texts import natural_text
from fastctx.vllm_plugin.impl_base import STATS
from tests.conftest import density

pytestmark = pytest.mark.engine

TEXT = natural_text()


def _greedy(max_tokens=20):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _staggered(llm, stages, on_step=None):
    """Feed requests in stages: each stage is added, then the engine steps once.

    Requests added while earlier ones decode share engine steps with them.
    Returns {request_id: (token_ids, num_cached_tokens)} once all finish.
    """
    engine = llm.llm_engine
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (list(out.outputs[0].token_ids), out.num_cached_tokens)
        if on_step:
            on_step()
    for stage in stages:
        for rid, prompt in stage:
            engine.add_request(rid, prompt, _greedy())
        step()
    while engine.has_unfinished_requests():
        step()
    return done


def test_chunked_prefill_batch_matches_stock(stock_llm, dense_llm):
    prompts = [TEXT[:700], TEXT[:1600], TEXT[:2600]]
    want = _tokens(stock_llm.generate(prompts, _greedy()))
    STATS.reset()
    density(dense_llm, "decode")
    got = _tokens(dense_llm.generate(prompts, _greedy()))
    assert got == want
    # The prompts exceed the 256-token step budget: later chunks attend to
    # cached context, and some steps mix decodes with prefills.
    assert STATS.prefix_prefills > 0 and STATS.mixed_steps > 0
    # Every decode went through fastctx (30 layers x 3 prompts x 19 decode steps), densely.
    decode = density(dense_llm, "decode")
    assert decode["method"] == "dense" and decode["dense_chunks"] == 30 * 3 * 19 and decode["density"] == 1.0


def test_mixed_step_with_decode_fresh_and_prefix_hit(stock_llm, dense_llm):
    shared = TEXT[5000:6200]  # > 256 tokens, so at least two full blocks can be cached
    warm = [("warm", shared)]
    stages = [
        [("decoder", TEXT[9000:9300])],
        [("prefix-hit", shared + " What does this code do?"), ("fresh", TEXT[12000:12500])],
    ]
    for llm in (stock_llm, dense_llm):
        _staggered(llm, [warm])
    want = _staggered(stock_llm, stages)
    STATS.reset()
    got = _staggered(dense_llm, stages)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    assert got["prefix-hit"][1] > 0, "the shared prompt should hit the prefix cache"
    # One step must hold a decode, a prefill over cached context, and a fresh prefill.
    assert any(decodes and any(q < s for q, s in prefills) and any(q == s for q, s in prefills)
               for decodes, prefills in STATS.history), STATS.history


def test_single_prompts_match_stock(stock_llm, dense_llm):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=32)
    for prompt in ["The capital of France is", TEXT[20000:20400], "def fibonacci(n):"]:
        want = _tokens(stock_llm.generate([prompt], params))
        got = _tokens(dense_llm.generate([prompt], params))
        assert got == want, prompt[:40]


def test_request_state_follows_the_engines_requests(dense_llm):
    """Per-request state is keyed by the engine's own request ids (vLLM suffixes the caller's),
    made when a request is first seen and freed once the engine reports it finished."""
    live_per_step = []

    def live() -> set[str]:
        return {rid.rsplit("-", 1)[0] for rid in dense_llm.collective_rpc("fastctx_live_requests")[0]}
    _staggered(dense_llm, [[("state-a", TEXT[100:900])], [("state-b", TEXT[3000:3400])]],
               on_step=lambda: live_per_step.append(live()))
    assert live_per_step[0] == {"state-a"}  # b not added yet
    assert any(ids == {"state-a", "state-b"} for ids in live_per_step)
    _staggered(dense_llm, [[("state-c", "One more step.")]])  # its steps carry the finished ids
    assert not {"state-a", "state-b"} & live()
