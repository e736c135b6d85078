"""Methods under test, and an engine's OpenAI server started for one of them.

A method is a ``fastctx`` config section (None: the stock engine, no fastctx backend); its
``kv_transfer`` key, if any, is a vLLM ``--kv-transfer-config`` instead (CacheBlend's
connector). vLLM gets the section as ``--additional-config``; SGLang as
``--attention-backend fastctx --fastctx-config``, started from SGLang's own environment
(``sglang_python``). The server runs in its own session (process group);
:meth:`EngineServer.stop` ends the API server and every process it started (engine core,
workers, scheduler, detokenizer), and checks that none of them is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from fastctx import methods
from fastctx.config import FastctxConfig
from fastctx.eval.client import ServerError

KV_TRANSFER = "kv_transfer"

# Each registered method's ``eval_section`` (knobs sized for an 8K-context model: MInference's
# own budgets (1000, 6096) are sized for 128K contexts and would be dense here); ``stock`` is vLLM
# without fastctx. ``NAME=JSON`` overrides or adds one.
METHODS = {"stock": None, **{name: cls.eval_section for name, cls in methods.registered().items()
                             if cls.eval_section is not None},
           # CacheBlend on stock attention, at the paper's ratio; its chunks are the prompt's pieces between
           # the separator (run it with --mode rag, where each query reorders the context's chunks).
           "cacheblend": {KV_TRANSFER: {"kv_connector": "FastctxBlendConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": {"recompute_ratio": 0.15, "local_cpu_gb": 1.0}}}}


def parse_methods(specs: list[str]) -> dict[str, dict | None]:
    """``["dense", "minference", 'mine={"attention": ...}']`` -> {name: fastctx section}."""
    methods = {}
    for spec in specs:
        name, sep, section = spec.partition("=")
        name = name.strip()
        if not sep:
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)} "
                                 f"or NAME='{{fastctx config JSON}}'")
            methods[name] = METHODS[name]
            continue
        try:
            parsed = json.loads(section)
        except json.JSONDecodeError as exc:
            raise ValueError(f"method {name!r}: its config is not JSON ({exc})") from exc
        if parsed is not None:
            check_method(parsed)  # a bad knob stops here, not after a server start
        methods[name] = parsed
    return methods


def _fastctx_part(section: dict) -> dict:
    """The method's ``fastctx`` config section, without its KV connector."""
    return {k: v for k, v in section.items() if k != KV_TRANSFER}


def check_method(section: dict) -> None:
    fastctx = _fastctx_part(section)
    if fastctx:
        FastctxConfig.from_section(fastctx)
    kv = section.get(KV_TRANSFER)
    if kv is not None and kv.get("kv_connector") == "FastctxBlendConnector":
        from fastctx.cacheblend.params import BlendParams

        BlendParams.from_dict(kv.get("kv_connector_extra_config"))


def uses_connector(section: dict | None) -> bool:
    return bool(section) and KV_TRANSFER in section


def method_flags(section: dict | None) -> list[str]:
    if section is None:
        return []
    flags = []
    fastctx = _fastctx_part(section)
    if fastctx:
        flags += ["--attention-backend", "CUSTOM", "--additional-config", json.dumps({"fastctx": fastctx})]
    if KV_TRANSFER in section:
        flags += ["--kv-transfer-config", json.dumps(section[KV_TRANSFER])]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineServer:
    """An engine's HTTP server for one method, on a free port; subclasses say how to start it."""

    engine: str

    def __init__(self, model: str, section: dict | None, log_path: Path, max_model_len: int,
                 cores: str | None = None, kv_space_gib: int = 2, extra_args: list[str] = (),
                 dtype: str = "float32"):
        self.model, self.section, self.log_path = model, section, Path(log_path)
        self.max_model_len, self.cores, self.kv_space_gib = max_model_len, cores, kv_space_gib
        self.extra_args = list(extra_args)
        self.dtype = dtype
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict:
        raise NotImplementedError

    def start(self, timeout: float = 600, attempts: int = 3) -> str:
        """Start the server and wait until it is healthy. The port is free when chosen but may be taken
        before the server binds it (an engine picks ports of its own meanwhile); the server then logs
        the bind error and, with SGLang, lingers: it is stopped and started again on another port."""
        deadline = time.time() + timeout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            port = free_port()
            with open(self.log_path, "a") as log:
                log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.command(port))}\n")
                log.flush()
                since = log.tell()
                self.proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                             env=self.environment(), start_new_session=True)
            self.url = f"http://127.0.0.1:{port}"
            if self._healthy_by(deadline, since, port, timeout):
                return self.url
            self.stop()
            if attempt + 1 < attempts:
                print(f"fastctx-eval: port {port} was taken before the server bound it; starting it again on "
                      "another port", file=sys.stderr)
        raise ServerError(f"server could not bind a free port in {attempts} attempts; log {self.log_path}")

    def _healthy_by(self, deadline: float, since: int, port: int, timeout: float) -> bool:
        """True once the server answers /health; False if it could not bind ``port`` (its log says so
        after offset ``since``); raises if it exits or the deadline passes."""
        while True:
            if self.proc.poll() is not None:
                if self._bind_failed(since, port):
                    return False
                raise ServerError(f"server exited with {self.proc.returncode} while starting; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            if self._bind_failed(since, port):
                return False
            if time.time() > deadline:
                self.stop()
                raise ServerError(f"server not healthy after {timeout:.0f} s; log {self.log_path}")
            time.sleep(1)

    def _bind_failed(self, since: int, port: int) -> bool:
        with open(self.log_path, errors="replace") as log:
            log.seek(since)
            return any("address already in use" in line and str(port) in line for line in log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self, within: float) -> bool:
        """Whether the server process is gone (waiting a little: a refused connection can
        arrive before the dying process is reaped)."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(within)
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the server, then SIGKILL whatever of its process group is left.

        Only the server itself gets SIGTERM: it stops its own workers (an SGLang scheduler that gets
        SIGTERM too dies as 'crashed', and its server then waits 5 s before cleaning up)."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:  # a live server stops its own workers
            os.kill(pid, signal.SIGTERM)
            _, family = psutil.wait_procs(family, timeout=grace)
        # What is left: workers that did not stop in time, or those of a server that was killed (no
        # longer its children, but still in its process group).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for p in family:  # a worker that left the group still belongs to this server
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, family = psutil.wait_procs(family, timeout=10)
        self.proc.wait(10)
        self.proc = None
        if family:
            raise ServerError(f"server processes {[p.pid for p in family]} survived SIGKILL")


class VllmServer(EngineServer):
    """``python -m vllm.entrypoints.openai.api_server`` in this interpreter."""

    engine = "vllm"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--port", str(port), "--host", "127.0.0.1", "--dtype", self.dtype, "--enforce-eager",
                "--max-model-len", str(self.max_model_len), "--enable-prefix-caching",
                "--enable-prompt-tokens-details", "--max-logprobs", "20",
                "--worker-extension-cls", "fastctx.vllm_plugin.worker.FastctxWorkerExtension",
                *method_flags(self.section), *self.extra_args]

    def environment(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # Ray sets it to 1
        env.update(VLLM_SERVER_DEV_MODE="1",  # POST /collective_rpc: the density counters
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_space_gib),
                   VLLM_CPU_OMP_THREADS_BIND=self.cores or os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
                   or f"0-{os.cpu_count() - 1}")
        return env


class SglangServer(EngineServer):
    """``python -m sglang.launch_server`` on the CPU, from SGLang's environment (``sglang_python``).

    ``kv_space_gib`` caps the token pool (``--max-total-tokens``) instead of a byte budget:
    SGLang checks ``--mem-fraction-static`` against the machine's available memory, which
    moves with other processes."""

    engine = "sglang"

    def command(self, port: int) -> list[str]:
        from fastctx.sglang_plugin import BACKEND

        if self.section and KV_TRANSFER in self.section:
            raise ValueError("CacheBlend's connector is a vLLM KV connector; SGLang runs have no --kv-transfer-config")
        backend = BACKEND if self.section else "torch_native"
        command = [sglang_python(), "-m", "sglang.launch_server", "--model-path", self.model, "--port", str(port),
                   "--host", "127.0.0.1", "--device", "cpu", "--dtype", self.dtype, "--attention-backend", backend,
                   "--disable-cuda-graph", "--mem-fraction-static", "0.5", "--context-length", str(self.max_model_len),
                   "--max-total-tokens", str(max(4 * self.max_model_len, 16384 * self.kv_space_gib)),
                   # vLLM's CPU server default: sparse methods estimate per chunk, so both engines
                   # chunk prompts alike.
                   "--chunked-prefill-size", "2048",
                   "--enable-cache-report", "--enable-metrics", *self.extra_args]
        if self.section:
            command += ["--fastctx-config", json.dumps(_fastctx_part(self.section))]
        return command

    def environment(self) -> dict:
        from fastctx.sglang_plugin.settings import ENV

        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", ENV)}
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        return env


SERVERS = {cls.engine: cls for cls in (VllmServer, SglangServer)}


def sglang_python() -> str:
    """The interpreter that runs SGLang: ``FASTCTX_SGLANG_PYTHON``, else this one if it imports
    sglang, else the ``.venv-sglang`` that ``make setup`` builds beside this checkout."""
    explicit = os.environ.get("FASTCTX_SGLANG_PYTHON")
    if explicit:
        return explicit
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        return sys.executable
    beside = Path(__file__).resolve().parents[2] / ".venv-sglang" / "bin" / "python"
    if beside.exists():
        return str(beside)
    raise ServerError("SGLang is not installed here: run `make setup` (it builds .venv-sglang) or set "
                      "FASTCTX_SGLANG_PYTHON to a Python that imports sglang")
