"""`fastctx-eval run` end to end on the embedded model: real vLLM servers, started and stopped
by the harness; interruption, a killed server and resumption; Ray replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from fastctx.eval.store import read_jsonl

pytestmark = pytest.mark.engine


def eval_cmd(out, *flags):
    return [sys.executable, "-m", "fastctx.eval.cli", "run", "--out", str(out), *flags]


def engine_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if any(mark in text for mark in ("vllm.entrypoints.openai.api_server", "VLLM", "EngineCore",
                                         "sglang.launch_server", "sglang::")):
            pids.add(p.pid)
    return pids


def assert_no_new_engine_processes(before: set[int]) -> None:
    deadline = time.time() + 20
    while (left := engine_pids() - before) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"engine processes left behind: {left}"


def requests_of(out):
    return [r for r in read_jsonl(out / "results.jsonl") if r["kind"] == "request"]


def wait_for(predicate, proc, timeout=400):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"fastctx-eval exited early with {proc.returncode}"
        assert time.time() < deadline, "timed out waiting for the run to progress"
        time.sleep(0.2)


# SGLang's run keeps one of the preset's tasks (an explicit flag overrides the preset): the
# harness's SGLang path is the same for every task, and CI's time is better spent elsewhere.
@pytest.mark.parametrize("engine,tasks", [("vllm", ("kv", "passkey")), ("sglang", ("passkey",))])
def test_smoke_preset_writes_results_report_and_plots(vllm_available, model_dir, tmp_path, engine, tasks, request):
    if engine == "sglang":
        request.getfixturevalue("sglang_available")
    before = engine_pids()
    out = tmp_path / "smoke"
    override = [] if tasks == ("kv", "passkey") else ["--tasks", ",".join(tasks)]
    proc = subprocess.run(eval_cmd(out, "--preset", "smoke", "--engine", engine, *override), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_no_new_engine_processes(before)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"dense", "minference"}
    for method in results["methods"].values():
        assert set(method["tasks"]) == set(tasks)
        for task in tasks:
            stats = method["tasks"][task]
            assert isinstance(stats["score"], float) and 0 <= stats["score"] <= 1
            assert isinstance(stats["ttft_p50_s"], float) and stats["ttft_p50_s"] > 0
            assert stats["n"] == 2 and stats["prompt_tokens"] > 2048
        assert method["overall"]["kv_usage_peak"] > 0
    mi = results["methods"]["minference"]
    assert mi["overall"]["density"] < 1.0  # the sparse prefill really ran
    assert results["methods"]["dense"]["overall"]["density"] == 1.0
    for part in ("answer_span", "natural_text"):
        agree = mi["fidelity_vs_dense"][part]
        assert agree["positions"] > 0 and 0 <= agree["top1_agree"] <= 1 and agree["kl_nats"] >= 0
    # Later turns of a session reuse the earlier turns' KV through prefix caching.
    later = [r for r in requests_of(out) if r["turn"] == 1]
    assert later and all(r["cached_tokens"] > 2000 for r in later)
    report = (out / "report.md").read_text()
    assert "| minference |" in report and "Partial run" not in report
    assert f"Engine **{'vLLM' if engine == 'vllm' else 'SGLang'}" in report
    assert (out / "score.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupt_server_kill_and_rerun_finish_without_redoing_items(vllm_available, model_dir, tmp_path):
    before = engine_pids()
    out = tmp_path / "resume"
    flags = ["--methods", "dense", "--tasks", "passkey,math_find", "--lengths", "400", "--queries", "3",
             "--max-new-tokens", "8", "--text-positions", "32"]
    # 1. Ctrl-C mid-run: a valid partial report, exit 130, the server stopped. (The harness
    # handles SIGINT itself: a background shell would otherwise start it with SIGINT ignored.)
    proc = subprocess.Popen(eval_cmd(out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(requests_of(out)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Partial run" in (out / "report.md").read_text()
    assert_no_new_engine_processes(before)
    first = {r["key"]: r["time"] for r in requests_of(out)}
    assert 2 <= len(first) < 6

    # 2. Rerun; kill its server mid-run: the harness reports it, restarts and finishes.
    proc = subprocess.Popen(eval_cmd(out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(requests_of(out)) >= len(first) + 1, proc)
    servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(servers) == 1
    os.killpg(servers[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    records = read_jsonl(out / "results.jsonl")
    assert any(r["kind"] == "event" and r["event"] == "server_died" for r in records)
    keys = Counter(r["key"] for r in requests_of(out))
    assert len(keys) == 6 and max(keys.values()) == 1  # every turn once: nothing redone
    assert all(requests_of_key["time"] == first[requests_of_key["key"]]
               for requests_of_key in requests_of(out) if requests_of_key["key"] in first)
    assert len(read_jsonl(out / "logprobs.jsonl")) == 3  # two answer spans and the text
    assert_no_new_engine_processes(before)

    # 3. A third run has nothing left: it starts no server and changes no result.
    size = (out / "results.jsonl").stat().st_size
    done = subprocess.run(eval_cmd(out, *flags), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "0 to run" in done.stdout
    assert (out / "results.jsonl").stat().st_size == size
    assert "Partial run" not in (out / "report.md").read_text()


def test_ray_replicas_share_the_sessions_in_multi_request_mode(vllm_available, model_dir, tmp_path):
    pytest.importorskip("ray", reason="--replicas needs Ray (make setup installs it)")
    before = engine_pids()
    out = tmp_path / "replicas"
    proc = subprocess.run(eval_cmd(out, "--methods", "dense", "--tasks", "kv", "--lengths", "400",
                                   "--sessions", "2", "--queries", "2", "--max-new-tokens", "8",
                                   "--text-positions", "16", "--mode", "multi-request", "--replicas", "2"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reqs = requests_of(out)
    assert len(reqs) == 4 and {r["replica"] for r in reqs} == {0, 1}
    # Each session ran on one replica, so its second request found the shared context cached.
    by_session = {}
    for r in reqs:
        by_session.setdefault(r["session"], set()).add(r["replica"])
    assert all(len(replicas) == 1 for replicas in by_session.values())
    assert all(r["cached_tokens"] >= 256 for r in reqs if r["turn"] == 1)
    assert json.loads((out / "results.json").read_text())["methods"]["dense"]["tasks"]["kv"]["n"] == 4
    assert_no_new_engine_processes(before)
