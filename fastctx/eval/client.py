"""Client for OpenAI-compatible servers (vLLM, SGLang): streamed completions with timings,
prompt logprobs, the server's Prometheus gauges and the fastctx density counters."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import fields

import requests

from fastctx.cacheblend.stats import RequestBlend


class ServerError(RuntimeError):
    """The server is unreachable, died or answered with an error."""


def _post(url: str, body: dict, timeout: float, stream: bool = False):
    try:
        reply = requests.post(url, json=body, timeout=timeout, stream=stream)
    except requests.RequestException as exc:
        raise ServerError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    if reply.status_code != 200:
        raise ServerError(f"{url}: HTTP {reply.status_code}: {reply.text[:500]}")
    return reply


def kv_cache_usage(base_url: str) -> float | None:
    """vLLM's ``kv_cache_usage_perc`` gauge (SGLang's ``token_usage``), 0..1; None if absent."""
    try:
        text = requests.get(base_url + "/metrics", timeout=5).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith(("vllm:kv_cache_usage_perc", "sglang:token_usage")):
            return float(line.rsplit(" ", 1)[1])
    return None


def complete(base_url: str, model: str, prompt: list[int], max_tokens: int, timeout: float) -> dict:
    """Greedy completion of token ids, streamed: text, TTFT, decode speed, token usage, and the
    KV cache usage sampled once the prefill is done (while the request still holds its blocks)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    reply = _post(base_url + "/v1/completions", body, timeout, stream=True)
    text, stamps, usage, kv = [], [], {}, {}
    sampler = None
    try:
        for line in reply.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                stamps.append(time.perf_counter() - start)
                text.append(chunk["choices"][0].get("text", ""))
                if sampler is None:
                    sampler = threading.Thread(target=lambda: kv.update(usage=kv_cache_usage(base_url)))
                    sampler.start()
            if chunk.get("usage"):
                usage = chunk["usage"]
    except requests.RequestException as exc:
        raise ServerError(f"stream from {base_url} broke: {exc}") from exc
    if sampler is not None:
        sampler.join()
    if not stamps:
        raise ServerError(f"{base_url} streamed no tokens")
    completion = usage.get("completion_tokens", len(stamps))
    decode_s = stamps[-1] - stamps[0]
    return {
        "text": "".join(text),
        "ttft_s": stamps[0],
        "latency_s": time.perf_counter() - start,
        "completion_tokens": completion,
        # Tokens after the first over the time they took; None when only one came.
        "decode_tok_s": (completion - 1) / decode_s if completion > 1 and decode_s > 0 else None,
        "prompt_tokens": usage.get("prompt_tokens", len(prompt)),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "kv_usage": kv.get("usage"),
    }


def prompt_logprobs(base_url: str, model: str, prompt: list[int], top_k: int, timeout: float,
                    start: int = 0) -> list[dict[int, float]]:
    """Top-``top_k`` next-token logprobs the model assigns at each prompt position from
    ``start`` on (entry j predicts token j), plus the actual token's own logprob."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": top_k}
    reply = _post(base_url + "/v1/completions", body, timeout).json()
    rows = reply["choices"][0]["prompt_logprobs"]
    return [{int(tok): entry["logprob"] for tok, entry in row.items()} for row in rows[max(start, 1):]]


def sglang_prompt_logprobs(base_url: str, model: str, prompt: list[int], top_k: int, timeout: float,
                           start: int = 0) -> list[dict[int, float]]:
    """``prompt_logprobs`` from an SGLang server (its native ``/generate``). Its
    ``input_top_logprobs`` entry j is the distribution that predicts prompt token
    ``logprob_start_len + j``, except that entry 0 is always empty, so the range starts one
    token early. The radix cache is flushed first so that the whole prompt is computed, as vLLM
    computes prompt-logprob requests (it skips its prefix cache for them): a prefix cached by
    an earlier request was computed in other chunks, and sparse methods estimate per chunk."""
    _post(base_url + "/flush_cache", {}, timeout)
    first = max(start, 1)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True, "logprob_start_len": first - 1, "top_logprobs_num": top_k}
    meta = _post(base_url + "/generate", body, timeout).json()["meta_info"]
    rows = []
    for (own, tok, _), top in zip(meta["input_token_logprobs"][1:], meta["input_top_logprobs"][1:]):
        row = {int(t): lp for lp, t, _ in top}
        row[int(tok)] = own
        rows.append(row)
    return rows


def sglang_density_counts(base_url: str, timeout: float = 30) -> dict | None:
    """fastctx's cumulative density counts in an SGLang server (``/server_info``), in the shape of
    ``fastctx_density``; None when its backend is not fastctx's."""
    try:
        reply = requests.get(base_url + "/server_info", timeout=timeout)
    except requests.RequestException as exc:
        raise ServerError(f"{base_url}/server_info: {exc}") from exc
    if reply.status_code != 200:
        raise ServerError(f"{base_url}/server_info: HTTP {reply.status_code}: {reply.text[:500]}")
    return _sum_phases([row for state in reply.json().get("internal_states", []) for row in state.get("fastctx", [])])


def _worker_rpc(base_url: str, method: str, timeout: float) -> list | None:
    """Each worker's answer to ``method`` (with "reset"), or None where the server has no such endpoint."""
    try:
        reply = requests.post(base_url + "/collective_rpc", timeout=timeout, json={"method": method, "args": ["reset"]})
    except requests.RequestException as exc:
        raise ServerError(f"{base_url}/collective_rpc: {exc}") from exc
    if reply.status_code in (404, 405):
        return None
    if reply.status_code != 200:
        raise ServerError(f"{base_url}/collective_rpc: HTTP {reply.status_code}: {reply.text[:500]}")
    return reply.json()["results"]


def fastctx_density(base_url: str, timeout: float = 30) -> dict | None:
    """Query/key pairs the fastctx methods read since the last call (then reset): prefill pairs as
    ``read_pairs``/``causal_pairs``, decode pairs (when a decode method runs) as ``decode_*``.
    Needs a vLLM server with ``VLLM_SERVER_DEV_MODE=1`` and fastctx's worker; None for a server
    without fastctx methods or without that endpoint (SGLang: ``sglang_density_counts``)."""
    workers = _worker_rpc(base_url, "fastctx_density", timeout)
    return _sum_phases([s for worker in workers or [] for s in (worker or [])])


def _sum_phases(stats: list[dict]) -> dict | None:
    if not stats:
        return None
    out = {}
    for phase, prefix in (("prefill", ""), ("decode", "decode_")):
        rows = [s for s in stats if s.get("phase", "prefill") == phase]
        if rows:
            out[prefix + "read_pairs"] = sum(s["read_pairs"] for s in rows)
            out[prefix + "causal_pairs"] = sum(s["causal_pairs"] for s in rows)
    return out


BLEND_COUNTS = tuple(f.name for f in fields(RequestBlend))


def fastctx_blend_stats(base_url: str, timeout: float = 30) -> dict | None:
    """CacheBlend's counts since the last call (then reset), summed over workers; None without the
    connector."""
    workers = [w for w in _worker_rpc(base_url, "fastctx_blend_stats", timeout) or [] if w]
    if not workers:
        return None
    return {k: sum(w[k] for w in workers) for k in BLEND_COUNTS}
