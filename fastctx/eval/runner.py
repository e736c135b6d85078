"""Runs the evaluation: every method on its own server, sessions turn by turn, fidelity items.

Work is planned up front (sessions, prompts, keys), so a rerun of the same command
skips what ``results.jsonl``/``logprobs.jsonl`` already hold. A server that dies or
hangs is reported as an event, restarted, and the item retried; nothing measured is
lost. ``--replicas N`` runs N servers as Ray actors and hands sessions to whichever
is free (a session stays on one replica, so its turns share the prefix cache).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastctx.eval.client import (
    ServerError,
    complete,
    fastctx_blend_stats,
    fastctx_density,
    prompt_logprobs,
    sglang_density_counts,
    sglang_prompt_logprobs,
)
from fastctx.eval.prompts import prompt_ids, teacher_forced_ids
from fastctx.eval.server import SERVERS, uses_connector
from fastctx.eval.store import ResultStore
from fastctx.eval.tasks import TASKS, Session, generate_session, load_scbench_sessions
from fastctx.eval.texts import prompt_token_ids

TOP_K = 20  # prompt logprobs per position kept for the fidelity comparison
RESTARTS_PER_ITEM = 2
# Set by the CLI's signal handler. Its KeyboardInterrupt can land inside a finalizer (an HTTP
# connection pool closing), where Python ignores it; the loops check this between items too.
STOP = threading.Event()


def stop_requested() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


@dataclass
class RunSpec:
    model: str
    methods: dict  # name -> fastctx section (None: the stock engine)
    tasks: list[str]
    lengths: list[int]
    mode: str = "multi-turn"
    queries: int = 5
    sessions: int = 1
    seed: int = 0
    max_new_tokens: int | None = None  # cap on SCBench's per-task limits
    data_dir: str | None = None
    text_positions: int = 256  # last positions of the natural text compared with dense
    replicas: int = 1
    url: str | None = None  # an already running server (one method)
    server_args: list[str] = field(default_factory=list)
    kv_space_gib: int = 2
    request_timeout: float = 600
    dtype: str = "float32"
    context_limit: int = 8192  # the model's context; set from its config
    engine: str = "vllm"  # a key of fastctx.eval.server.SERVERS

    def identity(self) -> dict:
        """What the stored items mean: a rerun into the same directory must agree on these."""
        return {k: getattr(self, k) for k in ("model", "mode", "queries", "sessions", "seed",
                                              "max_new_tokens", "data_dir", "text_positions", "dtype", "engine")}


@dataclass
class Item:
    key: str
    kind: str  # "request" | "answer" | "text"
    meta: dict
    prompt: list[int]
    max_tokens: int = 1
    answer: object = None
    start: int = 0  # first prompt position whose logprobs are kept


def max_tokens_for(spec: RunSpec, task: str) -> int:
    limit = TASKS[task].max_new_tokens
    return min(limit, spec.max_new_tokens) if spec.max_new_tokens else limit


def build_sessions(spec: RunSpec, tokenizer) -> list[Session]:
    sessions = []
    for task in spec.tasks:
        for length in spec.lengths:
            if spec.data_dir:
                sessions += load_scbench_sessions(spec.data_dir, task, tokenizer, length, spec.queries,
                                                  spec.sessions)
            else:
                sessions += [generate_session(task, tokenizer, length, spec.queries, spec.seed, i)
                             for i in range(spec.sessions)]
    return sessions


def plan(spec: RunSpec, tokenizer) -> dict[str, list[list[Item]]]:
    """Per method: units of work (a session's turns in order, or one fidelity item)."""
    sessions = build_sessions(spec, tokenizer)
    context_limit = spec.context_limit
    units: dict[str, list[list[Item]]] = {m: [] for m in spec.methods}
    fidelity_units: dict[str, list[list[Item]]] = {m: [] for m in spec.methods}
    longest = max(spec.lengths)
    with_fidelity = set()
    for s in sessions:
        meta = {"task": s.task, "length": s.length, "session": s.id, "mode": spec.mode}
        turns = []
        for t, turn in enumerate(s.turns):
            ids = prompt_ids(tokenizer, s, t, spec.mode)
            budget = max_tokens_for(spec, s.task)
            if len(ids) + budget > context_limit:
                raise ValueError(f"task {s.task} at {s.length} tokens: turn {t + 1} needs {len(ids)} prompt + "
                                 f"{budget} new tokens, over the model's {context_limit}; lower --lengths")
            turns.append(Item(f"{spec.mode}|{s.id}|turn{t}", "request", {**meta, "turn": t}, ids, budget,
                              turn["answer"]))
        fidelity = []
        # Teacher-forced answer span: each task's first session at the longest length, where
        # sparse methods differ most from dense.
        if s.length == longest and s.task not in with_fidelity:
            with_fidelity.add(s.task)
            ids, start = teacher_forced_ids(tokenizer, s, 0)
            fidelity.append(Item(f"answer|{s.id}", "answer", {**meta, "turn": 0}, ids, start=start))
        for method in spec.methods:
            units[method].append([_keyed(method, i) for i in turns])
            if not uses_connector(spec.methods[method]):
                fidelity_units[method] += [[_keyed(method, i)] for i in fidelity]
    text_len = min(longest, context_limit - 1)
    text = Item(f"text|{text_len}|{spec.text_positions}", "text", {"length": text_len},
                prompt_token_ids(tokenizer, text_len), start=text_len - spec.text_positions)
    # Sessions first (scores arrive early, and replicas each take one), fidelity items after. A KV
    # connector's method gets none: vLLM reads no cache (so no connector) for prompt-logprob requests,
    # and the scores would be full prefill's (benchmarks/cacheblend_ttft.py measures CacheBlend's).
    return {m: units[m] + fidelity_units[m] + ([] if uses_connector(spec.methods[m]) else [[_keyed(m, text)]])
            for m in spec.methods}


def _keyed(method: str, item: Item) -> Item:
    return Item(f"{method}|{item.key}", item.kind, {"method": method, **item.meta}, item.prompt,
                item.max_tokens, item.answer, item.start)


class Replica:
    """One server for one method, and the loop that runs units of work on it."""

    def __init__(self, spec: RunSpec, method: str, out_dir: str, index: int = 0, cores: str | None = None,
                 emit: Callable[[dict, bool], None] | None = None):
        self.spec, self.method, self.index = spec, method, index
        self.server = None if spec.url else SERVERS[spec.engine](
            spec.model, spec.methods[method], Path(out_dir) / "logs" / f"{method}.{index}.log",
            spec.context_limit, cores, spec.kv_space_gib, spec.server_args, spec.dtype)
        self.url = spec.url
        self.ever_started = False
        self._emit = emit
        self.collected: list[tuple[dict, bool]] = []

    def emit(self, record: dict, bulky: bool = False) -> None:
        if self._emit is not None:
            self._emit(record, bulky)
        else:  # in a Ray actor: handed back with the unit's result
            self.collected.append((record, bulky))

    def _event(self, event: str, **info) -> None:
        self.emit({"kind": "event", "event": event, "method": self.method, "replica": self.index,
                   "time": time.time(), **info})

    def ensure_started(self) -> None:
        if self.server is not None and not self.server.alive():
            t0 = time.perf_counter()
            self.url = self.server.start()
            self.ever_started = True
            self._event("server_started", seconds=round(time.perf_counter() - t0, 1))

    def run_unit(self, unit: list[Item], done: set[str]) -> list[tuple[dict, bool]]:
        self.collected = []
        for item in unit:
            stop_requested()
            if item.key in done:
                continue
            for attempt in range(RESTARTS_PER_ITEM + 1):
                try:
                    self.ensure_started()
                    self._run_item(item)
                    break
                except ServerError as exc:
                    dead = self.server is not None and self.server.exited(within=3)
                    self._event("server_died" if dead else "request_failed", item=item.key,
                                error=str(exc)[:2000], attempt=attempt)
                    if self.server is None:
                        break  # not our server: report the item and go on, the rest may work
                    if not self.ever_started:
                        raise  # a server that cannot start: retrying will not help
                    self.server.stop()
            else:
                self._event("item_failed", item=item.key)
        return self.collected

    def _run_item(self, item: Item) -> None:
        timeout = self.spec.request_timeout
        if item.kind == "request":
            blends = uses_connector(self.spec.methods.get(self.method))
            before = self._density()  # start the counts at this request
            if blends:
                fastctx_blend_stats(self.url)
            out = complete(self.url, self.spec.model, item.prompt, item.max_tokens, timeout)
            density = self._density(before)
            blend = fastctx_blend_stats(self.url) if blends else None
            score = TASKS[item.meta["task"]].score(out["text"], item.answer)
            self.emit({"kind": "request", "key": item.key, **item.meta, "replica": self.index, **out,
                       "answer": item.answer, "score": score, "density": density, "blend": blend,
                       "time": time.time()})
        else:
            logprobs = sglang_prompt_logprobs if self.spec.engine == "sglang" else prompt_logprobs
            rows = logprobs(self.url, self.spec.model, item.prompt, TOP_K, timeout, start=item.start)
            self.emit({"kind": item.kind, "key": item.key, **item.meta, "replica": self.index,
                       "targets": item.prompt[item.start:],
                       "logprobs": [{str(t): lp for t, lp in row.items()} for row in rows]}, True)

    def _density(self, before: dict | None = None) -> dict | None:
        """The pairs read since ``before`` (vLLM resets its counts on each read; SGLang's are
        cumulative, so the runner subtracts)."""
        if self.spec.engine != "sglang":
            return fastctx_density(self.url)
        now = sglang_density_counts(self.url)
        if now is None or before is None:
            return now
        return {k: v - before.get(k, 0) for k, v in now.items()}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def core_ranges(replicas: int) -> list[str | None]:
    """Contiguous, disjoint core sets, one per replica (vLLM's VLLM_CPU_OMP_THREADS_BIND)."""
    if replicas == 1:
        return [None]
    cpus = os.cpu_count() or 1
    if replicas > cpus:
        raise ValueError(f"--replicas {replicas} needs at least {replicas} cores, this machine has {cpus}")
    per = cpus // replicas
    return [f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i) for i in range(replicas)]


def run(spec: RunSpec, store: ResultStore, units: dict[str, list[list[Item]]], progress=None) -> None:
    """All methods in turn; each method's units on ``spec.replicas`` servers."""
    try:
        _run_methods(spec, store, units, progress)
    finally:
        if spec.replicas > 1:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _run_methods(spec: RunSpec, store: ResultStore, units: dict[str, list[list[Item]]], progress) -> None:
    for method, method_units in units.items():
        todo = [u for u in method_units if any(i.key not in store.done for i in u)]
        if not todo:
            continue
        if progress is not None:
            progress.set_description(method)
        if spec.replicas > 1:
            _run_ray(spec, method, store, todo, progress)
            continue
        replica = Replica(spec, method, str(store.dir), emit=_writer(store, progress))
        try:
            for unit in todo:
                replica.run_unit(unit, store.done)
        finally:
            replica.close()


def _writer(store: ResultStore, progress):
    def write(record: dict, bulky: bool) -> None:
        store.append(record, bulky)
        if progress is not None and "key" in record:
            progress.update(1)
    return write


def _run_ray(spec: RunSpec, method: str, store: ResultStore, todo: list[list[Item]], progress) -> None:
    import ray  # present: the CLI checked it

    if not ray.is_initialized():
        ray.init(num_cpus=spec.replicas, include_dashboard=False, log_to_driver=False)
    actor_cls = ray.remote(num_cpus=1)(Replica)
    actors = [actor_cls.remote(spec, method, str(store.dir), i, cores)
              for i, cores in enumerate(core_ranges(spec.replicas))]
    write = _writer(store, progress)
    pending, queue = {}, list(todo)
    try:
        while queue or pending:
            stop_requested()
            for actor in actors:
                if queue and actor not in pending.values():
                    pending[actor.run_unit.remote(queue.pop(0), set(store.done))] = actor
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                for record, bulky in ray.get(ref):
                    write(record, bulky)
    finally:
        # Stop each server before its actor goes, or vLLM's workers outlive it.
        ray.get([a.close.remote() for a in actors])
        for actor in actors:
            ray.kill(actor)
