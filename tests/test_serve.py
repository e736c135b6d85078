"""`fastctx serve` starts vLLM's OpenAI server with the plugin, and refuses bad config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.engine

FASTCTX_FLAGS = ["--attention-backend", "CUSTOM",
                 "--additional-config", json.dumps({"fastctx": {"attention": "dense"}})]
PROMPT = "The three most useful data structures in Python are"


def _serve_cmd(model_dir, *flags):
    return [sys.executable, "-m", "fastctx.cli", "serve", model_dir, "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", *flags]


def _server_env():
    # The real server path: EngineCore and worker in their own processes.
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def server(vllm_available, model_dir, tmp_path_factory):
    import requests

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve_cmd(model_dir, *FASTCTX_FLAGS, "--port", str(port)),
                                stdout=out, stderr=subprocess.STDOUT, env=_server_env(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not healthy after 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        deadline = time.time() + 30
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_greedy_text_matches_offline_dense(server, dense_llm):
    import requests
    from vllm import SamplingParams

    url, log = server
    reply = requests.post(url + "/v1/completions", timeout=120, json={
        "model": dense_llm.llm_engine.model_config.served_model_name,
        "prompt": PROMPT, "max_tokens": 24, "temperature": 0}).json()
    offline = dense_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24))
    assert reply["choices"][0]["text"] == offline[0].outputs[0].text
    # Stock attention would give the same text: prove fastctx's backend served it.
    assert "fastctx attention: 30 layers, prefill 'dense'" in log.read_text()


def test_server_refuses_bad_fastctx_config(vllm_available, model_dir):
    bad = ["--attention-backend", "CUSTOM", "--additional-config",
           json.dumps({"fastctx": {"atention": "dense"}})]
    proc = subprocess.run(_serve_cmd(model_dir, *bad, "--port", str(_free_port())),
                          capture_output=True, text=True, timeout=300, env=_server_env())
    assert proc.returncode != 0
    assert "fastctx config: unknown key 'atention'" in proc.stderr + proc.stdout


def test_eval_runs_against_a_server_it_did_not_start(server, tmp_path):
    """`fastctx-eval --url`: the harness only talks HTTP (this server has no dev-mode
    /collective_rpc, so no density), starts and stops nothing."""
    url, _ = server
    out = tmp_path / "url"
    proc = subprocess.run([sys.executable, "-m", "fastctx.eval.cli", "run", "--out", str(out), "--url", url,
                           "--methods", "served", "--tasks", "passkey", "--lengths", "300", "--queries", "2",
                           "--max-new-tokens", "8", "--text-positions", "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stats = results["methods"]["served"]["tasks"]["passkey"]
    assert stats["n"] == 2 and stats["ttft_p50_s"] > 0 and stats["density"] is None
    assert not (out / "logs").exists()
    assert requests_ok(url)


def requests_ok(url):
    import requests

    return requests.get(url + "/health", timeout=5).status_code == 200
