"""Result store, fidelity comparison, report building and CLI validation (no engine)."""

from __future__ import annotations

import json
import math
import os
import sys

import psutil
import pytest
import requests

from fastctx.eval.agreement import compare, position_kl
from fastctx.eval.cli import build_parser, check_run_dir, resolve
from fastctx.eval.report import aggregate, write_report
from fastctx.eval.runner import RunSpec, core_ranges
from fastctx.eval.server import EngineServer, parse_methods
from fastctx.eval.store import ResultStore, read_jsonl


def log_softmax(logits):
    m = max(logits)
    z = m + math.log(sum(math.exp(x - m) for x in logits))
    return [x - z for x in logits]


def test_kl_from_top_k_is_exact_with_every_token_and_a_lower_bound_otherwise():
    p = log_softmax([2.0, 1.0, 0.5, -1.0, -3.0, 0.0])
    q = log_softmax([1.5, 1.2, 0.1, -0.5, -2.0, 0.3])
    full = sum(math.exp(a) * (a - b) for a, b in zip(p, q))
    everything = {i: v for i, v in enumerate(p)}, {i: v for i, v in enumerate(q)}
    assert position_kl(*everything) == pytest.approx(full, rel=1e-9)
    top3 = [dict(sorted(d.items(), key=lambda kv: -kv[1])[:3]) for d in everything]
    assert 0 < position_kl(*top3) < full
    assert position_kl(everything[0], everything[0]) == 0


def test_compare_counts_top1_agreement_and_refuses_other_inputs():
    a = [{1: -0.1, 2: -2.5}, {3: -0.2, 4: -1.8}]
    b = [{1: -0.3, 2: -1.4}, {4: -0.4, 3: -1.2}]
    out = compare(a, b)
    assert out["top1_agree"] == 0.5 and out["positions"] == 2 and out["kl_nats"] > 0
    assert compare(a, a) == {"top1_agree": 1.0, "kl_nats": 0.0, "positions": 2}
    with pytest.raises(ValueError, match="not the same input"):
        compare(a, a[:1])


def test_store_resumes_from_finished_keys_and_survives_a_torn_line(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"key": "a", "kind": "request"})
    store.append({"kind": "event", "event": "server_died"})
    store.append({"key": "t", "kind": "text"}, bulky=True)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"key": "b", "kind": "req')  # killed mid-write
    again = ResultStore(tmp_path)
    assert again.done == {"a", "t"}
    again.append({"key": "c", "kind": "request"})
    assert [r.get("key") for r in read_jsonl(tmp_path / "results.jsonl")] == ["a", None, "c"]


def _request(method, task, turn, ttft, score, length=1024, density=None):
    return {"kind": "request", "key": f"{method}|{task}|{length}|{turn}", "method": method, "task": task,
            "length": length, "turn": turn, "ttft_s": ttft, "score": score, "decode_tok_s": 20.0,
            "prompt_tokens": 1000 + turn, "cached_tokens": 0 if turn == 0 else 990, "kv_usage": 0.1 + turn,
            "density": density}


def test_report_aggregates_scores_speedups_density_and_fidelity(tmp_path):
    store = ResultStore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "methods": {"dense": {"attention": "dense"}, "sparse": {"attention": "minference"}},
        "lengths": [1024], "mode": "multi-turn", "partial": False}))
    full = {"read_pairs": 100, "causal_pairs": 100}
    for turn, (ttft, score) in enumerate([(4.0, 1.0), (0.5, 0.0)]):
        store.append(_request("dense", "kv", turn, ttft, score, density=full))
    store.append(_request("sparse", "kv", 0, 2.0, 1.0, density={"read_pairs": 30, "causal_pairs": 100}))
    store.append(_request("sparse", "kv", 1, 0.5, 1.0, density={"read_pairs": 10, "causal_pairs": 10}))
    rows = [{1: -0.1, 2: -2.4}, {3: -0.1, 4: -2.4}]
    store.append({"kind": "text", "key": "dense|text|9", "method": "dense", "logprobs": rows}, bulky=True)
    store.append({"kind": "text", "key": "sparse|text|9", "method": "sparse",
                  "logprobs": [rows[0], {4: -0.1, 3: -2.4}]}, bulky=True)
    store.append({"kind": "event", "event": "server_died", "method": "sparse", "error": "boom"})
    res = aggregate(tmp_path)
    kv = res["methods"]["sparse"]["tasks"]["kv"]
    assert kv["score"] == 1.0 and kv["ttft_first_turn_p50_s"] == 2.0 and kv["speedup_vs_dense"] == 2.0
    assert kv["density"] == pytest.approx(40 / 110) and kv["kv_usage_peak"] == 1.1
    assert res["methods"]["dense"]["tasks"]["kv"]["score"] == 0.5
    fid = res["methods"]["sparse"]["fidelity_vs_dense"]
    assert fid["natural_text"]["top1_agree"] == 0.5 and fid["answer_span"] is None
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| sparse | 1 |" in text and "server_died" in text and "Partial run" not in text
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["sparse"]["tasks"]["kv"]["score"] == 1.0
    assert (tmp_path / "score.png").stat().st_size > 0 and (tmp_path / "ttft_vs_length.png").stat().st_size > 0


def test_methods_parse_with_clear_errors():
    methods = parse_methods(["dense", 'mine={"attention": "minference", "minference": {"v_size": 64}}'])
    assert methods["mine"]["minference"]["v_size"] == 64
    with pytest.raises(ValueError, match="unknown method 'densse'"):
        parse_methods(["densse"])
    with pytest.raises(ValueError, match="not JSON"):
        parse_methods(["x={bad"])
    with pytest.raises(ValueError, match="v_sise"):
        parse_methods(['x={"attention": "minference", "minference": {"v_sise": 1}}'])


def test_a_connector_method_runs_stock_attention_with_its_kv_transfer_config():
    from fastctx.eval.server import method_flags, uses_connector

    methods = parse_methods(["cacheblend", 'cb5={"kv_transfer": {"kv_connector": "FastctxBlendConnector", '
                             '"kv_role": "kv_both", "kv_connector_extra_config": {"recompute_ratio": 0.05}}}'])
    flags = method_flags(methods["cb5"])
    assert flags[0] == "--kv-transfer-config" and "--attention-backend" not in flags
    assert json.loads(flags[1])["kv_connector_extra_config"]["recompute_ratio"] == 0.05
    assert uses_connector(methods["cacheblend"]) and not uses_connector(None)
    with pytest.raises(ValueError, match="recompute_ratio=3"):
        parse_methods(['cb={"kv_transfer": {"kv_connector": "FastctxBlendConnector", '
                       '"kv_connector_extra_config": {"recompute_ratio": 3}}}'])


def test_report_sums_cacheblend_counts(tmp_path):
    store = ResultStore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"methods": {"dense": {}, "cb": {"kv_transfer": {}}},
                                                      "lengths": [1024], "mode": "rag", "partial": False}))
    store.append(_request("dense", "kv", 0, 1.0, 1.0))
    for turn, hit in enumerate((0, 4)):
        r = _request("cb", "kv", turn, 1.0, 1.0)
        r["blend"] = {"chunks_hit": hit, "chunks_missed": 4 - hit, "tokens_reused": 100 * hit,
                      "tokens_recomputed": 50, "load_s": 0.5, "blend_s": 0.25}
        store.append(r)
    blend = aggregate(tmp_path)["methods"]["cb"]["overall"]["blend"]
    assert blend["chunks_hit"] == 4 and blend["chunks_missed"] == 4 and blend["tokens_reused"] == 400
    assert "## CacheBlend" in write_report(tmp_path).read_text()


def _args(*argv):
    return build_parser().parse_args(["run", "--out", "unused", "--model", "m", *argv])


def test_run_flags_are_validated_and_dense_is_always_the_reference():
    spec = resolve(_args("--preset", "smoke", "--methods", "flexprefill"))
    assert list(spec.methods) == ["dense", "flexprefill"] and spec.tasks == ["kv", "passkey"]
    spec = resolve(_args("--methods", 'minference,mi={"attention": "minference", "minference": '
                         '{"v_size": 512, "s_size": 1024}},flexprefill'))
    assert list(spec.methods) == ["dense", "minference", "mi", "flexprefill"]
    assert spec.methods["mi"]["minference"] == {"v_size": 512, "s_size": 1024}
    with pytest.raises(ValueError, match="unknown task"):
        resolve(_args("--tasks", "kv,needle"))
    with pytest.raises(ValueError, match="--lengths takes token counts"):
        resolve(_args("--lengths", "4k"))
    with pytest.raises(ValueError, match="one --methods LABEL"):
        resolve(_args("--url", "http://x", "--methods", "dense,minference"))
    assert resolve(_args("--engine", "sglang", "--methods", "stock")).engine == "sglang"
    with pytest.raises(ValueError, match="cacheblend: CacheBlend's connector is a vLLM KV connector"):
        resolve(_args("--engine", "sglang", "--methods", "stock,cacheblend"))


def test_a_run_directory_refuses_other_item_defining_settings(tmp_path):
    from fastctx.eval.cli import write_config

    spec = RunSpec(model="m", methods={"dense": {}}, tasks=["kv"], lengths=[512])
    write_config(tmp_path, spec, partial=True)
    check_run_dir(tmp_path, spec)  # same settings: resume
    spec.methods["sparse"] = {"attention": "minference"}  # a new method: fine
    check_run_dir(tmp_path, spec)
    spec.seed = 5
    with pytest.raises(ValueError, match="seed: 0 -> 5"):
        check_run_dir(tmp_path, spec)
    spec.seed = 0
    spec.methods["dense"] = {"attention": "minference"}
    with pytest.raises(ValueError, match="methods.dense"):
        check_run_dir(tmp_path, spec)


def test_replicas_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert core_ranges(1) == [None]
    assert core_ranges(2) == ["0-3", "4-7"]
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert core_ranges(2) == ["0", "1"]
    with pytest.raises(ValueError, match="needs at least 3 cores"):
        core_ranges(3)


class _PortTakenOnce(EngineServer):
    """A stand-in server process (the harness's start/stop logic, no engine): its first launch logs
    uvicorn's bind error for its port and lingers, as an SGLang server does; the next one serves
    /health, from a worker child in its process group."""

    engine = "stand-in"

    def command(self, port: int) -> list[str]:
        script = f"""
import http.server, os, subprocess, sys, time
marker = {str(self.log_path.parent / "launched")!r}
if not os.path.exists(marker):
    open(marker, "w").close()
    print("ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
          "address already in use", flush=True)
    time.sleep(600)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a worker
http.server.HTTPServer(("127.0.0.1", {port}), type("H", (http.server.BaseHTTPRequestHandler,), {{
    "do_GET": lambda self: (self.send_response(200), self.end_headers())}})).serve_forever()
"""
        return [sys.executable, "-c", script]

    def environment(self) -> dict:
        return dict(os.environ)


def test_a_server_whose_port_was_taken_starts_again_on_another_and_stops_with_its_workers(tmp_path, capsys):
    srv = _PortTakenOnce("model", None, tmp_path / "server.log", max_model_len=1024)
    url = srv.start(timeout=60)
    assert requests.get(url + "/health", timeout=5).status_code == 200
    assert "starting it again on another port" in capsys.readouterr().err
    assert srv.log_path.read_text().count("=== ") == 2
    family = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
    assert len(family) == 2
    srv.stop(grace=2)  # the stand-in leaves its worker running: stop() kills what is left of the group
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
