"""SpecTr inside stock vLLM: fastctx's custom_class proposer verifies k chains, vLLM keeps its tokens.

SpecTr engines run their cores in their own processes (``make_process_llm``)."""

from __future__ import annotations

import pytest

from fastctx.eval.texts import natural_text, token_ids
from tests.conftest import close, make_process_llm

pytestmark = pytest.mark.engine

PROPOSER = "fastctx.vllm_plugin.spectr.SpecTrProposer"


def spectr_engine(model_dir, chains=4, depth=3, spec=None, **extra):
    return make_process_llm(model_dir, speculative_config={"method": "custom_class", "model": PROPOSER,
                                                    "num_speculative_tokens": depth + 1, **(spec or {})},
                     additional_config={"fastctx_spectr": {"chains": chains, **extra}})


@pytest.fixture(scope="module")
def spectr_llm(vllm_available, model_dir):
    llm = spectr_engine(model_dir)
    yield llm
    close(llm)


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    ids = token_ids(AutoTokenizer.from_pretrained(model_dir), natural_text())
    # Repeated text gives the n-gram draft something to match; the others are plain text.
    return [ids[:300] + ids[:300], ids[1000:1400], ids[2000:2100]]


def generate(llm, prompts, temperature, max_tokens=40, **kw):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, **kw)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                                use_tqdm=False)]


def stats(llm) -> dict:
    return llm.collective_rpc("fastctx_spectr_stats", args=("reset",))[0]


def test_greedy_spectr_gives_the_tokens_of_no_speculation(spectr_llm, stock_llm, prompts):
    stats(spectr_llm)
    assert generate(spectr_llm, prompts, 0.0) == generate(stock_llm, prompts, 0.0)
    s = stats(spectr_llm)
    assert s["steps"] > 0 and s["accepted_drafts"] > 0  # the repeated prompt is drafted right
    # Greedy chains are all alike, so one goes to vLLM's pass to verify: vLLM adds no token of its own.
    print(s)
    assert s["tokens_per_step"] == s["tokens_per_verification"] > 1.2


def test_the_proposers_target_distribution_is_vllms(spectr_llm, prompts):
    """K-SEQ draws from the proposer's q: it must be the distribution vLLM samples from. The check
    compares the proposer's log-probs behind each verified token with vLLM's for the same positions."""
    assert spectr_llm.collective_rpc("fastctx_spectr_check", args=("on",)) == [True]
    stats(spectr_llm)
    generate(spectr_llm, prompts, 1.0, max_tokens=24)
    s = stats(spectr_llm)
    spectr_llm.collective_rpc("fastctx_spectr_check", args=("off",))
    print(f"{s['logit_gap_count']} verified runs, largest log-prob gap {s['logit_gap_max']:.2e}")
    assert s["logit_gap_count"] > 10 and s["logit_gap_max"] < 1e-3, s


def test_sampling_runs_k_chains_and_accepts_drafts(spectr_llm, prompts):
    stats(spectr_llm)
    outs = generate(spectr_llm, prompts, 1.0, max_tokens=48)
    assert all(len(o) == 48 for o in outs)
    s = stats(spectr_llm)
    assert s["steps"] > 0 and s["accepted_drafts"] > 0 and s["skipped"] == 0


def test_one_chain_is_verified_in_vllms_pass(spectr_llm, prompts):
    stats(spectr_llm)
    outs = generate(spectr_llm, prompts, 1.0, max_tokens=48, extra_args={"spectr": {"depth": 3, "chains": 1}})
    assert all(len(o) == 48 for o in outs)
    s = stats(spectr_llm)
    print(s)
    assert set(s["arms"]) == {"d3k1"} and s["accepted_drafts"] > 0
    assert s["tokens_per_step"] == s["tokens_per_verification"]


def test_a_request_picks_its_own_depth_and_chains(spectr_llm, prompts):
    stats(spectr_llm)
    generate(spectr_llm, prompts[:1], 1.0, max_tokens=12, extra_args={"spectr": {"depth": 1, "chains": 2}})
    generate(spectr_llm, prompts[1:2], 1.0, max_tokens=12, extra_args={"spectr": {"depth": 0}})
    s = stats(spectr_llm)
    assert set(s["arms"]) == {"d1k2", "d0k4"} and s["arms"]["d0k4"] == 12  # one proposal per engine step
    assert s["steps"] == s["arms"]["d1k2"]


def test_requests_with_top_p_or_a_seed_decode_without_drafts(spectr_llm, stock_llm, prompts):
    stats(spectr_llm)
    seeded = generate(spectr_llm, prompts[:1], 1.0, max_tokens=16, seed=7)
    assert seeded == generate(stock_llm, prompts[:1], 1.0, max_tokens=16, seed=7)
    generate(spectr_llm, prompts[:1], 1.0, max_tokens=8, top_p=0.9)
    s = stats(spectr_llm)
    assert s["steps"] == 0 and s["skipped"] > 0


def test_bad_settings_stop_the_engine_with_the_reason(vllm_available, model_dir):
    with pytest.raises(Exception, match=r"chains=0: give 1-16 chains"):
        spectr_engine(model_dir, chains=0)
    with pytest.raises(Exception, match="num_speculative_tokens=1 leaves no draft depth"):
        spectr_engine(model_dir, depth=0)
    with pytest.raises(Exception, match="scylla=true picks the depth per step itself"):
        spectr_engine(model_dir, scylla=True, spec={"num_speculative_tokens_per_batch_size": [[1, 8, 2]]})


def test_vllms_per_batch_size_schedule_sets_the_depth(vllm_available, model_dir, prompts):
    """vLLM's num_speculative_tokens_per_batch_size: one request drafts 2 tokens, two or more none. (Like
    vLLM's scheduler the lookup counts a step's requests; while the others still prefill, the first
    to decode may step alone.)"""
    llm = spectr_engine(model_dir, chains=2, depth=3, spec={"num_speculative_tokens_per_batch_size": [[1, 1, 2],
                                                                                                      [2, 8, 0]]})
    try:
        generate(llm, prompts[:1], 1.0, max_tokens=16)
        alone = stats(llm)
        generate(llm, prompts, 1.0, max_tokens=16)
        together = stats(llm)
        generate(llm, prompts, 1.0, max_tokens=8, extra_args={"spectr": {"depth": 1}})
        asked = stats(llm)
    finally:
        close(llm)
    assert set(alone["arms"]) == {"d2k2"} and alone["steps"] > 0
    assert set(together["arms"]) <= {"d0k2", "d2k2"} and together["arms"]["d0k2"] >= 3 * 12
    assert together["arms"].get("d2k2", 0) <= 4
    assert set(asked["arms"]) == {"d1k2"}  # a request naming its depth runs it whatever the schedule says


def test_scylla_picks_depth_and_chains_per_step_and_exposes_its_law(vllm_available, model_dir, stock_llm, prompts):
    llm = spectr_engine(model_dir, chains=2, depth=2, scylla=True)
    try:
        generate(llm, prompts, 1.0, max_tokens=40)
        s = stats(llm)
        # A request naming its arm runs it; Scylla does not time those steps as its own.
        generate(llm, prompts[:2], 1.0, max_tokens=12, extra_args={"spectr": {"depth": 2, "chains": 1}})
        asked = stats(llm)
        # Whatever lengths it picks (no speculation included), greedy decoding gives the tokens of none.
        assert generate(llm, prompts, 0.0) == generate(stock_llm, prompts, 0.0)
    finally:
        close(llm)
    assert set(asked["arms"]) == {"d2k1"}
    assert asked["scylla_law"]["observations"] == s["scylla_law"]["observations"]
    # Per batch size Scylla probes no drafts (d0) and the cheapest drafts (d1k1), then runs what its laws
    # rank best or a neighbour of it: always arms of this engine (depth 0-2, 1-2 chains).
    assert {"d0k1", "d1k1"} <= set(s["arms"]) <= {"d0k1", "d1k1", "d1k2", "d2k1", "d2k2"}
    assert s["scylla_law"]["observations"] > 0
    # The proposer tells it which requests are copying (their newest token the n-gram draft's likeliest)
    arms = [arm for per_batch in s["scylla_law"]["arms"].values() for arm in per_batch.values()]
    assert any(arm["tokens_copying"] is not None for arm in arms) and any(arm["tokens"] is not None for arm in arms)
