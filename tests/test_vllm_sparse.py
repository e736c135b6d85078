"""MInference and FlexPrefill inside vLLM: exact at full budgets, sparse and reported otherwise."""

from __future__ import annotations

import pytest

from fastctx.config import FastctxConfig
from fastctx.eval.texts import natural_text
from fastctx.methods import DensityStats
from fastctx.vllm_plugin import attention as backend
from tests.conftest import _make_llm

pytestmark = pytest.mark.engine

TEXT = natural_text()
PROMPTS = [TEXT[30000:34000], TEXT[50000:55000], "The capital of France is"]

FULL_BUDGET = {
    "minference": {"attention": "minference", "dense_below": 0},  # (1000, 6096) >= these lengths
    "flexprefill": {"attention": "flexprefill", "dense_below": 0,
                    "flexprefill": {"gamma": 1.0, "min_budget": 8192}},
}
SPARSE = {"attention": "minference", "dense_below": 0, "minference": {"v_size": 30, "s_size": 100}}


def _run(llm, section):
    from vllm import SamplingParams

    method = backend._METHODS[FastctxConfig.from_section(section)]
    method.stats = DensityStats()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    return [list(o.outputs[0].token_ids) for o in outs], method.stats


@pytest.fixture(scope="module")
def engines(vllm_available, model_dir):
    sections = {**FULL_BUDGET, "sparse": SPARSE}
    return {name: (_make_llm(model_dir, attention_config={"backend": "CUSTOM"},
                             additional_config={"fastctx": section}), section)
            for name, section in sections.items()}


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_equals_dense(engines, dense_llm, name):
    from vllm import SamplingParams

    want = [list(o.outputs[0].token_ids)
            for o in dense_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))]
    got, stats = _run(*engines[name])
    assert got == want
    assert stats.sparse_chunks > 0 and stats.density == 1.0


def test_small_budgets_are_sparse_and_reported(engines):
    got, stats = _run(*engines["sparse"])
    assert all(len(tokens) == 20 for tokens in got)
    assert stats.sparse_chunks > 0 and 0.05 < stats.density < 0.6
    reported = [s for s in backend.density_stats() if s["config"]["minference"]["s_size"] == 100]
    assert reported and reported[0]["density"] == round(stats.density, 4)
