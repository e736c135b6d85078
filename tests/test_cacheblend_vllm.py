"""CacheBlend in a real vLLM engine: exactness at ratio 1, reuse at ratio 0, salts, dtypes, Redis.

One fp32 engine with fastctx's connector (prefix caching on, Redis as the
shared tier), stock vLLM as the reference, then a second fp32 replica, a bf16
engine and an engine of a fine-tuned copy of the model on the same Redis. Engines with the connector run in their own
processes (vLLM keeps one KV connector per process, which would leak into the
in-process engines of other tests; see ``make_process_llm``). Prompts are built from token ids (documents
joined by the separator's ids), so a document's tokens are the same wherever it
sits.
"""

from __future__ import annotations

import os

import pytest

from fastctx.cacheblend.params import BlendParams
from fastctx.eval.texts import natural_text, token_ids
from tests.conftest import close, make_process_llm, wait_for

pytestmark = pytest.mark.engine

DOC_TOKENS = 200


@pytest.fixture(scope="module")
def parts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = token_ids(tok, natural_text())
    docs = [text[i * DOC_TOKENS:(i + 1) * DOC_TOKENS] for i in range(8)]
    sep = tok.encode(BlendParams().separator, add_special_tokens=False)
    system = token_ids(tok, "Answer from the documents below, each after a line of hashes. " * 12) + sep
    question = sep + token_ids(tok, "\n\nQuestion: what do the documents describe? Answer:")
    return docs, sep, system, question


def prompt(parts, order, system=True):
    docs, sep, sys_ids, question = parts
    ids = list(sys_ids) if system else []
    for j, d in enumerate(order):
        ids += docs[d] + (sep if j < len(order) - 1 else [])
    return ids + question


def connector(port, **extra):
    return {"kv_connector": "FastctxBlendConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"local_cpu_gb": 0.25, "remote_url": f"redis://127.0.0.1:{port}", **extra}}


def blend_engine(model_dir, port, connector_extra=None, **kw):
    return make_process_llm(model_dir, kv_transfer_config=connector(port, **(connector_extra or {})), **kw)


@pytest.fixture(scope="module")
def blend_llm(vllm_available, model_dir, redis_server):
    llm = blend_engine(model_dir, redis_server[0])
    yield llm
    close(llm)


def run(llm, prompts, ratio=None, salt=None, max_tokens=12):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"recompute_ratio": ratio}} if ratio is not None else None
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra)
    inputs = [{"prompt_token_ids": p, **({"cache_salt": salt} if salt else {})} for p in prompts]
    return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, sp, use_tqdm=False)]


def stats(llm) -> dict:
    return llm.collective_rpc("fastctx_blend_stats", args=("reset",))[0]


def test_ratio_one_reproduces_full_prefill_in_any_order_and_in_a_batch(blend_llm, stock_llm, parts):
    stats(blend_llm)
    first = [prompt(parts, [0, 1, 2, 3])]
    assert run(blend_llm, first, ratio=1.0) == run(stock_llm, first)
    s = stats(blend_llm)
    assert s["chunks_missed"] == 5 and s["chunks_hit"] == 0  # the system text is a chunk too
    batch = [prompt(parts, [3, 1, 0, 2]), prompt(parts, [2, 3, 1, 0], system=False)]
    assert run(blend_llm, batch, ratio=1.0) == run(stock_llm, batch)
    s = stats(blend_llm)
    assert s["requests"] == 2 and s["chunks_hit"] >= 6 and s["tokens_reused"] == 0


def test_ratio_zero_reuses_every_stored_token(blend_llm, parts):
    run(blend_llm, [prompt(parts, [4, 5, 6], system=False)], ratio=0.0)  # stores 4, 5, 6
    stats(blend_llm)
    ids = prompt(parts, [6, 4, 5], system=False)
    out = run(blend_llm, [ids], ratio=0.0)
    s = stats(blend_llm)
    region = (len(ids) - 1) // 128 * 128  # the connector fills whole blocks, vLLM computes the rest
    # Every stored token of the chunks after the first, as is; the chunk opening the prompt (before its
    # stored positions) and the separators are computed.
    reused = min(region, 3 * DOC_TOKENS + 2 * len(parts[1])) - 2 * len(parts[1]) - DOC_TOKENS
    assert s["chunks_hit"] == 3 and s["chunks_missed"] == 0
    assert s["tokens_reused"] == reused
    assert s["tokens_recomputed"] == region - reused
    assert len(out[0]) == 12


def test_a_stored_chunk_placed_where_it_was_computed_is_exact_at_ratio_zero(blend_llm, stock_llm, parts):
    docs, sep, _, question = parts
    # Stored chunks are prefilled after the separator alone; a prompt opening with the separator and
    # that chunk holds it in the same context, so reusing every stored token changes nothing.
    run(blend_llm, [sep + docs[1] + sep + docs[7] + question], ratio=1.0)  # stores docs 1 and 7
    stats(blend_llm)
    ids = sep + docs[7] + sep + docs[1][:60] + question
    assert run(blend_llm, [ids], ratio=0.0) == run(stock_llm, [ids])
    s = stats(blend_llm)
    # The region ends where the last chunk's last whole block does: at 128, after the 3 separator tokens.
    assert s["chunks_hit"] == 1 and s["tokens_reused"] == 128 - len(sep)


def test_chunks_stored_after_the_prompt_head_are_exact_right_after_it(vllm_available, model_dir, redis_server,
                                                                      stock_llm, parts):
    docs, sep, system, question = parts
    llm = blend_engine(model_dir, redis_server[0], {"chunk_context": "prompt_head"})
    try:
        run(llm, [system + docs[2] + sep + docs[3] + question], ratio=1.0)  # stores docs 2 and 3 after the head
        stats(llm)
        # Doc 3 now follows the head directly, in the context it was stored in: reusing every stored token
        # is exact (stored after the separator alone, it would not be).
        ids = system + docs[3] + sep + docs[2][:60] + question
        assert run(llm, [ids], ratio=0.0) == run(stock_llm, [ids])
        s = stats(llm)
        assert s["chunks_hit"] == 1 and s["chunks_missed"] == 0 and s["tokens_reused"] > 0
    finally:
        close(llm)


def test_prefix_cache_hit_then_blended_chunks(blend_llm, stock_llm, parts):
    from vllm import SamplingParams

    run(blend_llm, [prompt(parts, [0, 1, 2])], ratio=0.15)
    stats(blend_llm)
    # Same system text, chunks in another order: a prefix-cache hit, then the blend. Exact at ratio 1.
    ids = prompt(parts, [2, 0, 1])
    assert run(blend_llm, [ids], ratio=1.0) == run(stock_llm, [ids])
    assert stats(blend_llm)["chunks_hit"] == 4
    sp = SamplingParams(temperature=0, max_tokens=12, extra_args={"kv_transfer_params": {"recompute_ratio": 0.15}})
    out = blend_llm.generate([{"prompt_token_ids": prompt(parts, [1, 2, 0])}], sp, use_tqdm=False)[0]
    s = stats(blend_llm)
    # The system text's tail past the cached block is read from its stored chunk: 4 hits.
    assert out.num_cached_tokens >= 128 and s["chunks_hit"] == 4
    assert 0 < s["tokens_recomputed"] < s["tokens_reused"]


def test_requests_with_different_salts_never_share_chunks(blend_llm, parts):
    ids = prompt(parts, [7, 5], system=False)
    run(blend_llm, [ids], salt="tenant-a")
    stats(blend_llm)
    run(blend_llm, [prompt(parts, [5, 7], system=False)], salt="tenant-b")
    assert stats(blend_llm)["chunks_hit"] == 0
    run(blend_llm, [prompt(parts, [5, 7], system=False)], salt="tenant-a")
    assert stats(blend_llm)["chunks_hit"] == 2


def test_another_dtype_never_hits(blend_llm, model_dir, redis_server, parts):
    """(That a replica of the same model and dtype hits every chunk, in another process: the Ray test.)"""
    port, client, _ = redis_server
    assert wait_for(lambda: any(True for _ in client.scan_iter(match="*kv_bytes")))
    fmt = blend_llm.collective_rpc("fastctx_blend_format")[0]
    assert fmt["dtype"] == "float32" and len(fmt["fingerprint"]) == 32
    ids = prompt(parts, [3, 2, 1, 0])  # every chunk stored by the first engine
    bf16 = blend_engine(model_dir, port, dtype="bfloat16")
    try:
        assert bf16.collective_rpc("fastctx_blend_format")[0]["dtype"] == "bfloat16"
        run(bf16, [ids])
        s = stats(bf16)
        assert s["chunks_hit"] == 0 and s["chunks_missed"] == 5
    finally:
        close(bf16)


def fine_tuned_copy(model_dir, dest):
    """The model with one tensor nudged, as a fine-tune would: same config, tokenizer and shapes."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for name in os.listdir(model_dir):
        if name != "model.safetensors":
            os.symlink(os.path.join(model_dir, name), dest / name)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def test_another_model_with_the_same_shapes_never_hits(blend_llm, model_dir, redis_server, parts, tmp_path):
    ids = prompt(parts, [2, 0, 3])  # every chunk stored by the first engine
    run(blend_llm, [ids])
    stats(blend_llm)
    other = blend_engine(fine_tuned_copy(model_dir, tmp_path / "tuned"), redis_server[0])
    try:
        assert other.collective_rpc("fastctx_blend_format")[0]["fingerprint"] != \
            blend_llm.collective_rpc("fastctx_blend_format")[0]["fingerprint"]
        run(other, [ids])
        s = stats(other)
        assert s["chunks_hit"] == 0 and s["chunks_missed"] == 4
    finally:
        close(other)


def test_ray_replicas_of_the_eval_harness_share_chunks_through_redis(vllm_available, model_dir, redis_server,
                                                                     tmp_path):
    import ray
    from transformers import AutoTokenizer

    from fastctx.eval.prompts import prompt_ids
    from fastctx.eval.runner import Item, Replica, RunSpec, core_ranges
    from fastctx.eval.tasks import generate_session

    tok = AutoTokenizer.from_pretrained(model_dir)
    session = generate_session("multidoc_qa", tok, 1500, 2, seed=5)
    spec = RunSpec(model=model_dir, methods={"cacheblend": {"kv_transfer": connector(redis_server[0])}},
                   tasks=["multidoc_qa"], lengths=[1500], mode="rag", kv_space_gib=1, context_limit=2048)
    items = [Item(f"rag|{t}", "request", {"task": "multidoc_qa", "length": 1500, "session": session.id,
                                          "mode": "rag", "turn": t}, prompt_ids(tok, session, t, "rag"), 8,
                  session.turns[t]["answer"]) for t in range(2)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actors = [ray.remote(num_cpus=1)(Replica).remote(spec, "cacheblend", str(tmp_path), i, cores)
              for i, cores in enumerate(core_ranges(2))]
    try:
        # The first replica meets every chunk; the second, another process, gets the next query.
        first = ray.get(actors[0].run_unit.remote([items[0]], set()))
        second = ray.get(actors[1].run_unit.remote([items[1]], set()))
    finally:
        ray.get([a.close.remote() for a in actors])
        for a in actors:
            ray.kill(a)
        ray.shutdown()
    a, b = ([r for r, _ in got if r["kind"] == "request"][0] for got in (first, second))
    chunks = len(session.chunks)
    assert a["replica"] == 0 and a["blend"]["chunks_missed"] == chunks and a["blend"]["chunks_hit"] == 0
    assert b["replica"] == 1 and b["blend"]["chunks_hit"] == chunks and b["blend"]["chunks_missed"] == 0
    assert b["blend"]["tokens_reused"] > 0


def test_requests_succeed_when_redis_stops(blend_llm, stock_llm, redis_server, parts):
    _, _, proc = redis_server
    proc.kill()
    proc.wait()
    # A lead chunk no earlier prompt had: vLLM's prefix cache holds the KV earlier blends produced.
    ids = prompt(parts, [3, 6, 1], system=False)
    assert run(blend_llm, [ids], ratio=1.0) == run(stock_llm, [ids])
    assert run(blend_llm, [prompt(parts, [1, 3, 6], system=False)], ratio=0.15)[0]


def test_bad_settings_stop_the_engine_with_the_reason(vllm_available, model_dir, redis_server):
    with pytest.raises(Exception, match=r"recompute_ratio=2.*\[0, 1\]"):
        blend_engine(model_dir, redis_server[0], connector_extra={"recompute_ratio": 2})
    # Known only once the model is loaded: the engine fails to start (the reason is in its log).
    with pytest.raises(Exception, match="initialization failed"):
        blend_engine(model_dir, redis_server[0], connector_extra={"check_layer": 30})
