"""SambaY served by stock vLLM through fastctx's model registration, against the PyTorch reference.

A random checkpoint (fp32) is served with chunked prefill at 256 tokens, so
prompts longer than that reach the Mamba layers in chunks that resume a carried
state, and the sliding window (32 tokens) is crossed inside and across chunks.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastctx.models.sambay.checkpoint import write_checkpoint
from fastctx.models.sambay.reference import SambaYForCausalLM
from tests.conftest import _make_llm

pytestmark = pytest.mark.engine

SMALL = dict(num_hidden_layers=8, hidden_size=128, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=32, mamba_d_state=8)
NO_APC = dict(enable_prefix_caching=False, worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension")


@pytest.fixture(scope="module")
def sambay_dir(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("sambay") / "ckpt"
    write_checkpoint(out, model_dir, seed=3, **SMALL)
    return str(out)


@pytest.fixture(scope="module")
def reference(sambay_dir):
    return SambaYForCausalLM.from_pretrained(sambay_dir)


@pytest.fixture(scope="module")
def sambay_llm(vllm_available, sambay_dir):
    return _make_llm(sambay_dir, **NO_APC)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 49000, (n,), generator=g).tolist() for n in lengths]


def _sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, **kw)


def _max_logprob_error(reference, prompt, out) -> float:
    tokens = list(out.token_ids)
    want = torch.log_softmax(reference(torch.tensor(prompt + tokens)), -1)
    return max(abs(step[t].logprob - want[len(prompt) - 1 + i, t].item())
               for i, (t, step) in enumerate(zip(tokens, out.logprobs)))


def test_batch_with_chunked_prefill_matches_reference(sambay_llm, reference):
    prompts = _prompts([20, 100, 300, 700])
    outs = sambay_llm.generate([{"prompt_token_ids": p} for p in prompts], _sampling(max_tokens=12, logprobs=3))
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference.greedy(prompt, 12), len(prompt)
        assert _max_logprob_error(reference, prompt, out.outputs[0]) < 1e-4, len(prompt)


def test_prompt_logits_match_reference_across_window_and_chunks(sambay_llm, reference):
    prompt = _prompts([600], seed=1)[0]
    out = sambay_llm.generate([{"prompt_token_ids": prompt}], _sampling(max_tokens=1, prompt_logprobs=0))[0]
    want = torch.log_softmax(reference(torch.tensor(prompt)), -1)
    errors = [abs(step[prompt[i + 1]].logprob - want[i, prompt[i + 1]].item())
              for i, step in enumerate(out.prompt_logprobs[1:])]
    assert len(errors) == 599 and max(errors) < 1e-4


def test_requests_joining_while_others_decode_match_reference(sambay_llm, reference):
    """Decode steps that share the batch with new prefills: state slots, decode-first order, KV sharing."""
    engine = sambay_llm.llm_engine
    prompts = _prompts([50, 400, 90], seed=2)
    done = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"join-{i}", {"prompt_token_ids": prompt}, _sampling(max_tokens=16))
        for _ in range(3):  # a few steps, so the next request arrives while this one decodes
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    for i, prompt in enumerate(prompts):
        assert done[f"join-{i}"] == reference.greedy(prompt, 16), i


def test_kv_cache_is_one_full_layer_plus_windows_and_states(sambay_llm):
    from fastctx.vllm_plugin.kv_footprint import engine_kv_footprint

    kv = engine_kv_footprint(sambay_llm, 2048)
    heads, dim, layers = SMALL["num_key_value_heads"], SMALL["hidden_size"] // SMALL["num_attention_heads"], 8
    assert (kv["full_attention_layers"], kv["sliding_window_layers"], kv["mamba_layers"]) == (
        1, layers // 4, layers // 4 + 1)
    assert kv["full_bytes_per_token"] == 2 * heads * dim * 4  # K and V of one layer, fp32
    assert kv["sliding_window_bytes_per_sequence"] == layers // 4 * SMALL["sliding_window"] * 2 * heads * dim * 4
    inner = 2 * SMALL["hidden_size"]
    assert kv["mamba_bytes_per_sequence"] == (layers // 4 + 1) * inner * (3 + SMALL["mamba_d_state"]) * 4


def test_fast_prefill_skips_the_cross_decoder_for_prompt_tokens_and_keeps_outputs(vllm_available, sambay_dir,
                                                                                  reference):
    """``--kv-sharing-fast-prefill``: only sampled tokens run layers L/2+2.. (YOCO); generations are unchanged."""
    from fastctx.vllm_plugin import sambay

    calls = []
    original = sambay.SambaYModel._sampled_tokens

    def spy(self):
        picked = original(self)
        calls.append(None if picked is None else int(picked[1]))
        return picked

    sambay.SambaYModel._sampled_tokens = spy
    try:
        llm = _make_llm(sambay_dir, **NO_APC, kv_sharing_fast_prefill=True)
        prompts = _prompts([30, 500], seed=4)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _sampling(max_tokens=6, logprobs=3))
    finally:
        sambay.SambaYModel._sampled_tokens = original
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference.greedy(prompt, 6)
        assert _max_logprob_error(reference, prompt, out.outputs[0]) < 1e-4
    # every step, prompt chunks of 256 tokens included, ran the cross-decoder on one token per request
    picked = [c for c in calls if c is not None]
    assert len(picked) >= 6 and max(picked) <= 2


def test_prefix_caching_is_refused_with_the_flag_to_pass(vllm_available, sambay_dir):
    # In its own process: a refused engine must not leave state behind in the session's process.
    code = ("import os\n"
            "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'; os.environ['VLLM_CPU_KVCACHE_SPACE'] = '1'\n"
            "from vllm import LLM\n"
            f"LLM(model={sambay_dir!r}, dtype='float32', enforce_eager=True, max_model_len=1024)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "prefix caching is not supported for SambaY" in run.stderr and "--no-enable-prefix-caching" in run.stderr


def test_fastctx_methods_run_on_the_full_attention_layer(vllm_available, sambay_dir, reference):
    """``--attention-backend CUSTOM``: layer L/2+1's two differential maps go through fastctx's runtime.
    ``dense`` there (prefill and decode) keeps the reference's outputs; a sink+window method reads less."""
    prompts = _prompts([40, 600], seed=5)
    dense = _make_llm(sambay_dir, **NO_APC, attention_config={"backend": "CUSTOM"},
                      additional_config={"fastctx": {"attention": "dense", "decode": "dense"}})
    outs = dense.generate([{"prompt_token_ids": p} for p in prompts], _sampling(max_tokens=8, logprobs=3))
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference.greedy(prompt, 8)
        assert _max_logprob_error(reference, prompt, out.outputs[0]) < 1e-4
    rows = {row["phase"]: row for row in dense.collective_rpc("fastctx_density")[0]}
    assert rows["prefill"]["density"] == 1.0 and rows["prefill"]["dense_chunks"] >= 2 * 2  # 2 maps x 2 prompts
    assert rows["decode"]["density"] == 1.0 and rows["decode"]["dense_chunks"] >= 2 * 2 * 7
    streaming = _make_llm(sambay_dir, **NO_APC, attention_config={"backend": "CUSTOM"},
                          additional_config={"fastctx": {"attention": "streaming", "decode": "streaming",
                                                         "streaming": {"sink": 8, "local": 64}}})
    streaming.generate([{"prompt_token_ids": prompts[1]}], _sampling(max_tokens=4))
    rows = {row["phase"]: row for row in streaming.collective_rpc("fastctx_density")[0]}
    assert rows["prefill"]["density"] < 0.5 and rows["decode"]["density"] < 0.5, rows
