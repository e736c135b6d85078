"""fastctx inside a real SGLang server on the CPU (started from SGLang's own environment).

One server runs at a time: SGLang's ``torch_native`` backend first (the reference), then
fastctx's backend with each method. Prompts of ~1000 tokens prefill in chunks of 512
(``--chunked-prefill-size``), so later chunks attend to a cached prefix; a prompt that
extends an earlier one hits the radix cache.
"""

from __future__ import annotations

import contextlib

import pytest
import requests

from fastctx.eval.client import ServerError
from fastctx.eval.server import SglangServer
from tests.method_sections import DECODE_METHODS, FULL_BUDGET, PROMPTS, TEXT

pytestmark = pytest.mark.engine

MAX_NEW = 12
EXTRA = ["--chunked-prefill-size", "512", "--random-seed", "0"]
# Sent alone after PROMPTS[0]: its first 3000 characters are PROMPTS[0]'s, so its prefill starts
# from the radix cache.
PREFIX_HIT = PROMPTS[0][:3000] + TEXT[90000:90600]


@pytest.fixture(scope="module")
def sglang(sglang_available, model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("sglang")

    @contextlib.contextmanager
    def server(section, name, extra=()):
        srv = SglangServer(model_dir, section, logs / f"{name}.log", max_model_len=4096,
                           extra_args=[*EXTRA, *extra])
        url = srv.start(timeout=300)
        try:
            yield url
        finally:
            srv.stop()
    return server


def generate(url: str, prompts: list[str]) -> list[dict]:
    reply = requests.post(url + "/generate", timeout=600, json={
        "text": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW}})
    reply.raise_for_status()
    return reply.json()


def run(url: str) -> dict:
    """Greedy tokens of a batch of PROMPTS, then of the prompt that hits the radix cache."""
    batch = generate(url, PROMPTS)
    hit = generate(url, [PREFIX_HIT])[0]
    return {"batch": [o["output_ids"] for o in batch], "hit": hit["output_ids"],
            "hit_cached": hit["meta_info"]["cached_tokens"]}


def density(url: str) -> dict[str, dict]:
    """The server's fastctx density counts since it started, per phase."""
    states = requests.get(url + "/server_info", timeout=30).json()["internal_states"]
    return {row["phase"]: row for state in states for row in state.get("fastctx", [])}


@pytest.fixture(scope="module")
def torch_native(sglang):
    with sglang(None, "torch_native") as url:
        return run(url)


def test_dense_equals_torch_native_with_pages_of_16_prefix_chunks_a_radix_hit_and_a_batch(sglang, torch_native):
    """With --page-size 16 the pool is read in place as [pages, kv_heads, 16, head_dim] through a block
    table (the other servers here keep SGLang's default page of one token)."""
    with sglang({"attention": "dense", "decode": "dense"}, "dense_pages16", ["--page-size", "16"]) as url:
        got = run(url)
        counts = density(url)
    assert got["batch"] == torch_native["batch"] and got["hit"] == torch_native["hit"]
    assert got["hit_cached"] >= 512  # the radix cache held PROMPTS[0]'s first chunks (whole pages of them)
    prefill, decode = counts["prefill"], counts["decode"]
    assert prefill["method"] == "dense" and prefill["density"] == 1.0
    # Every prefill chunk of every layer went through fastctx: 30 layers x (the batch's chunks + the hit's).
    assert prefill["dense_chunks"] >= 30 * (len(PROMPTS) + 1)
    # And every decode step: at least (MAX_NEW - 1) for each request, in every layer (SGLang's overlapped
    # scheduler may run one more step before it sees a request finish).
    assert decode["dense_chunks"] >= 30 * (MAX_NEW - 1) * (len(PROMPTS) + 1)


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_methods_equal_dense(sglang, torch_native, name):
    """SGLang's decode (``decode`` unset) under the prefill-only methods, fastctx's under the others;
    the server reports the method and the knobs it was given. (That sparse budgets read less in
    SGLang: test_eval_run's smoke preset.)"""
    section = FULL_BUDGET[name]
    with sglang(section, name) as url:
        got = run(url)
        counts = density(url)
    assert got == torch_native
    prefill = counts["prefill"]
    assert prefill["method"] == name and prefill["density"] == 1.0
    for key, value in section.items():
        reported = prefill["config"][key]
        assert ({k: reported[k] for k in value} if isinstance(value, dict) else reported) == value, key
    if name != "lserve":  # (lserve's prefill windows hold every key here, so it reads densely)
        assert prefill["sparse_chunks"] > 0
    if name in DECODE_METHODS:
        assert counts["decode"]["density"] == 1.0
        assert counts["decode"]["dense_chunks"] + counts["decode"]["sparse_chunks"] > 0


def test_a_bad_config_stops_the_launch_with_its_message(sglang, model_dir, tmp_path):
    srv = SglangServer(model_dir, {"attention": "flexprefil"}, tmp_path / "bad.log", max_model_len=4096)
    with pytest.raises(ServerError, match="attention='flexprefil' is not a fastctx prefill method"):
        srv.start(timeout=300)
    srv.stop()


SPECTR = ["--speculative-algorithm", "SPECTR", "--speculative-num-draft-tokens", "9",
          "--fastctx-spectr", '{"chains": 4}']  # 4 chains of depth 2


SPECULATION = {
    "SPECTR": SPECTR,
    "SPECTR_SCYLLA": [*SPECTR[:4], "--fastctx-spectr", '{"chains": 4, "scylla": true}'],
    "NGRAM": ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"],
}


@pytest.mark.parametrize("algorithm", SPECULATION)
def test_speculative_greedy_equals_torch_native(sglang, torch_native, algorithm):
    """Draft trees (fastctx's SpecTr chains, at fixed or Scylla-chosen shapes, SGLang's own NGRAM
    trie) verified by the backend's tree reads: greedy tokens are those of no speculation, radix hit
    included; drafts of a prompt that repeats itself are accepted; sampling runs too."""
    with sglang({"attention": "dense"}, f"spec_{algorithm}", SPECULATION[algorithm]) as url:
        got = run(url)
        repeats = generate(url, [" ".join(["one two three four five six seven eight"] * 12)])[0]["meta_info"]
        sampled = requests.post(url + "/generate", timeout=600, json={
            "text": PROMPTS[:2], "sampling_params": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": MAX_NEW}})
        sampled.raise_for_status()
        states = requests.get(url + "/server_info", timeout=30).json()["internal_states"]
    spectr = [row for state in states for row in state.get("fastctx_spectr", [])]
    if algorithm == "SPECTR_SCYLLA":  # several tree shapes, all within the 8 draft nodes, and the fitted law
        shapes = [tuple(int(x) for x in arm[1:].split("k")) for arm in spectr[0]["arms"]]
        assert len(shapes) > 1 and all(depth * k <= 8 for depth, k in shapes)
        assert spectr[0]["scylla_law"]["observations"] > 0
    elif algorithm == "SPECTR":
        assert list(spectr[0]["arms"]) == ["d2k4"]
    assert got == torch_native
    assert repeats["spec_verify_ct"] > 0 and repeats["spec_accept_length"] > 1.5
    assert all(len(o["output_ids"]) == MAX_NEW for o in sampled.json())
    assert min(o["meta_info"].get("spec_verify_ct", 0) for o in sampled.json()) > 0


@pytest.mark.parametrize("section,extra,message", [
    ({"attention": "dense", "decode": "streaming"}, ["--speculative-algorithm", "NGRAM"], "verifies with dense reads"),
    ({"attention": "dense"}, ["--speculative-algorithm", "EAGLE"], "does not run draft models"),
    ({"attention": "dense"}, [*SPECTR[:3], "8"], "1 \\+ 4 x depth"),
    (None, SPECTR, "add --attention-backend fastctx"),
])
def test_speculative_settings_fastctx_cannot_serve_stop_the_launch(sglang, model_dir, tmp_path, section, extra,
                                                                   message):
    srv = SglangServer(model_dir, section, tmp_path / "spec.log", max_model_len=4096, extra_args=extra)
    with pytest.raises(ServerError, match=message):
        srv.start(timeout=300)
    srv.stop()
