"""``fastctx-eval``: SCBench-style shared-context evaluation against live engines.

    fastctx-eval run --preset smoke --out runs/smoke
    fastctx-eval run --methods dense,minference --tasks kv,passkey --lengths 2048,4096 \\
        --mode multi-turn --out runs/mine
    fastctx-eval report runs/mine

``dense`` is always run too: it is the reference for speedups and fidelity.
Rerunning the same command into the same --out resumes: finished items are skipped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fastctx.eval.prompts import MODES
from fastctx.eval.server import METHODS
from fastctx.eval.tasks import TASKS

if TYPE_CHECKING:  # the runner is imported lazily: the CLI starts fast
    from fastctx.eval.runner import RunSpec

PRESETS = {
    # Wiring check: two methods, two tasks, one short length (~3 min on 2 cores).
    "smoke": dict(methods="dense,minference", tasks="kv,passkey", lengths="2048", queries=2,
                  max_new_tokens=32, text_positions=128),
    # Every method and task at 2K and 4K tokens (~13 min on 2 cores).
    "quick": dict(methods="stock,dense,minference,flexprefill", tasks=",".join(TASKS), lengths="2048,4096",
                  queries=2, max_new_tokens=32, text_positions=256),
}
DEFAULTS = dict(methods="dense,minference,flexprefill", tasks=",".join(TASKS), lengths="2048,4096,8000",
                queries=5, max_new_tokens=None, text_positions=256)


def _csv(text: str) -> list[str]:
    """Comma-separated items; commas inside a JSON object (a method's config) do not split."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [x.strip() for x in [*items, current] if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastctx-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run methods x tasks on live servers, then write the report")
    run.add_argument("--out", required=True, help="run directory (results.jsonl, results.json, report.md, PNGs)")
    run.add_argument("--preset", choices=list(PRESETS), help="a ready-made run; explicit flags override it")
    run.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    run.add_argument("--methods", help=f"comma list of {', '.join(METHODS)}, or NAME='{{fastctx config JSON}}' "
                     "(default: dense,minference,flexprefill)")
    run.add_argument("--tasks", help=f"comma list of {', '.join(TASKS)} (default: all)")
    run.add_argument("--lengths", help="comma list of context lengths in tokens (default: 2048,4096,8000)")
    run.add_argument("--mode", choices=MODES, default="multi-turn")
    run.add_argument("--queries", type=int, help="queries per shared context (default 5, as SCBench)")
    run.add_argument("--sessions", type=int, default=1, help="contexts per task and length")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-new-tokens", type=int, help="cap on SCBench's per-task generation limits")
    run.add_argument("--text-positions", type=int, help="last positions of natural text compared with dense")
    run.add_argument("--data-dir", help="read SCBench's JSONL files from here instead of generating tasks")
    run.add_argument("--replicas", type=int, default=1, help="servers per method, as Ray actors (needs ray)")
    run.add_argument("--url", help="use this running OpenAI-compatible server (vLLM or SGLang) for the one "
                     "method given; fastctx-eval starts none")
    run.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                     help="extra server flag (repeat), e.g. --server-arg=--max-num-batched-tokens=512")
    run.add_argument("--engine", choices=["vllm", "sglang"], default="vllm",
                     help="the engine every server runs (sglang: from SGLang's own environment, see README; "
                          "`stock` is then its torch_native backend)")
    run.add_argument("--kv-space-gib", type=int, default=2,
                     help="KV cache per server: VLLM_CPU_KVCACHE_SPACE (vLLM), a token-pool cap (SGLang)")
    run.add_argument("--dtype", choices=["float32", "bfloat16"],
                     help="engine dtype (default: the one stock vLLM is fastest at on this CPU: bfloat16 "
                     "with AVX512-BF16, else float32)")
    run.add_argument("--request-timeout", type=float, default=600)
    rep = sub.add_parser("report", help="rebuild results.json, report.md and the plots of a run directory")
    rep.add_argument("out")
    return parser


def resolve(args) -> RunSpec:
    from fastctx.eval.runner import RunSpec
    from fastctx.eval.server import parse_methods

    base = dict(DEFAULTS, **PRESETS.get(args.preset, {}))
    pick = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in base}
    names = _csv(pick["methods"])
    if args.url:
        if len(names) != 1 or args.replicas > 1:
            raise ValueError("--url runs against one server: give one --methods LABEL (e.g. dense or sglang) "
                             "and no --replicas")
        methods = {names[0].partition("=")[0]: None}
    else:
        methods = parse_methods(["dense", *names])
    if args.engine == "sglang":
        from fastctx.eval.server import uses_connector

        vllm_only = [name for name, section in methods.items() if uses_connector(section)]
        if vllm_only:
            raise ValueError(f"{', '.join(vllm_only)}: CacheBlend's connector is a vLLM KV connector; run it "
                             "with --engine vllm")
    tasks = _csv(pick["tasks"])
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    try:
        lengths = sorted({int(x) for x in _csv(pick["lengths"])})
    except ValueError as exc:
        raise ValueError(f"--lengths takes token counts like 2048,4096 ({exc})") from exc
    if not lengths or min(lengths) < 128:
        raise ValueError("--lengths must be at least 128 tokens")
    if not 1 <= pick["text_positions"] < max(lengths):
        raise ValueError(f"--text-positions must be between 1 and the longest length ({max(lengths)}) - 1")
    if pick["queries"] < 1 or args.sessions < 1 or args.replicas < 1:
        raise ValueError("--queries, --sessions and --replicas must be at least 1")
    if args.replicas > 1:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--replicas > 1 needs Ray: pip install 'fastctx[ray]'") from None
    if args.model:
        model = args.model
    else:
        from fastctx.default_model import require_default_model

        model = str(require_default_model())
    return RunSpec(model=model, methods=methods, tasks=tasks, lengths=lengths, mode=args.mode,
                   queries=pick["queries"], sessions=args.sessions, seed=args.seed,
                   max_new_tokens=pick["max_new_tokens"], data_dir=args.data_dir,
                   text_positions=pick["text_positions"], replicas=args.replicas, url=args.url,
                   server_args=args.server_arg, kv_space_gib=args.kv_space_gib,
                   request_timeout=args.request_timeout, dtype=args.dtype or _fast_dtype(), engine=args.engine)


def _fast_dtype() -> str:
    from fastctx.kernels._cpu_ext import cpu_features, fast_engine_dtype

    dtype = fast_engine_dtype()
    found = [name for name, on in cpu_features().items() if on]
    print(f"fastctx-eval: engine dtype {dtype} (CPU features found: {', '.join(found) or 'none'})", flush=True)
    return dtype


def _settings(identity: dict, methods: dict) -> dict:
    # A method's items are keyed by its name: the same name must mean the same config.
    return {**identity, **{f"methods.{name}": section for name, section in methods.items()}}


def check_run_dir(out: Path, spec) -> None:
    """A directory holds one run: resuming with other item-defining settings would mix them.
    Adding methods, tasks or lengths is fine."""
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        return
    stored = json.loads(cfg_path.read_text())
    # Runs written before the engine was a setting ran vLLM.
    old = _settings({"engine": "vllm", **stored.get("identity", {})}, stored.get("methods", {}))
    new = _settings(spec.identity(), spec.methods)
    diff = [k for k in new if k in old or not k.startswith("methods.")]
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff if old.get(k) != new[k]]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}); "
                         f"use another --out, or the same settings to resume")


def write_config(out: Path, spec, partial: bool) -> None:
    cfg = {**asdict(spec), "identity": spec.identity(), "partial": partial}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both end the run cleanly (servers stopped, partial report), also
    when the shell started us with SIGINT ignored, as it does for background jobs."""
    from fastctx.eval.runner import STOP

    def interrupt(signum, frame):
        STOP.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def cmd_run(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from fastctx.eval.client import ServerError
    from fastctx.eval.report import write_report
    from fastctx.eval.runner import plan, run
    from fastctx.eval.store import ResultStore

    spec = resolve(args)
    out = Path(args.out)
    check_run_dir(out, spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    spec.context_limit = AutoConfig.from_pretrained(spec.model).max_position_embeddings
    units = plan(spec, tokenizer)
    store = ResultStore(out)
    write_config(out, spec, partial=True)
    keys = [item.key for method_units in units.values() for unit in method_units for item in unit]
    total = len(keys)
    todo = sum(key not in store.done for key in keys)
    print(f"fastctx-eval: {total} items, {total - todo} already done, {todo} to run; results in {out}",
          flush=True)
    from tqdm import tqdm

    interrupted = False
    failure = None
    _stop_on_signals()
    with tqdm(total=todo, unit="item", dynamic_ncols=True) as progress:
        try:
            run(spec, store, units, progress)
        except KeyboardInterrupt:
            interrupted = True
        except ServerError as exc:
            failure = exc
    from fastctx.eval.runner import STOP

    interrupted = interrupted or STOP.is_set()
    done = sum(key in store.done for key in keys)
    write_config(out, spec, partial=done < total)
    report = write_report(out)
    if failure is not None:
        print(f"fastctx-eval: error: {failure}\nPartial report {report}", file=sys.stderr)
        return 1
    if interrupted:
        print(f"fastctx-eval: interrupted; partial report {report} ({done}/{total} items). "
              f"Rerun the same command to finish.", file=sys.stderr)
        return 130
    if done < total:
        print(f"fastctx-eval: {total - done} item(s) failed (see the report's incidents); rerun to retry. "
              f"Report: {report}", file=sys.stderr)
        return 1
    print(f"fastctx-eval: report {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from fastctx.eval.report import write_report

            if not (Path(args.out) / "results.jsonl").exists():
                raise ValueError(f"{args.out} has no results.jsonl: not a fastctx-eval run directory")
            print(f"fastctx-eval: report {write_report(Path(args.out))}")
            return 0
        return cmd_run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastctx-eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
