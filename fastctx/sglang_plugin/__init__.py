"""SGLang adapter: fastctx's attention methods behind ``--attention-backend fastctx``.

The method and its knobs are the same JSON section as vLLM's ``fastctx`` config, passed
as ``--fastctx-config '{...}'`` (a flag this plugin adds to SGLang's parser) or in the
environment variable ``FASTCTX_SGLANG_CONFIG`` (for ``sglang.Engine``).

``register`` is the ``sglang.srt.plugins`` entry point; SGLang calls it in the
launching process (for argument parsing) and in each scheduler process (where the
backend is built). Every algorithm lives in ``fastctx.core``, ``fastctx.methods``
and ``fastctx.kernels``, shared with the vLLM adapter.
"""

from __future__ import annotations

BACKEND = "fastctx"
SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
# The scheduler's state report (``GET /server_info``, ``internal_states``) carries fastctx's density.
STATE_REPORT = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController" \
               ".get_internal_state"


def register() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND])

    @register_attention_backend(BACKEND)
    def _create(runner):
        from fastctx.sglang_plugin.backend import FastctxAttnBackend

        return FastctxAttnBackend(runner)

    HookRegistry.register(STATE_REPORT, _report_density, HookType.AFTER)
    HookRegistry.register(SERVER_ARGS + ".add_cli_args", _add_flag, HookType.AFTER)
    HookRegistry.register(SERVER_ARGS + ".from_cli_args", _take_flag, HookType.BEFORE)


def _add_flag(result, parser, *_args, **_kwargs):
    parser.add_argument("--fastctx-config", default=None, metavar="JSON",
                        help="fastctx's config section for --attention-backend fastctx, e.g. "
                             '\'{"attention": "flexprefill", "decode": "streaming"}\' (sets FASTCTX_SGLANG_CONFIG)')
    return result


def _take_flag(*args, **kwargs):
    """Validates ``--fastctx-config`` (or ``FASTCTX_SGLANG_CONFIG``) and hands it to the scheduler
    processes through the environment they inherit; ServerArgs itself has no field for it."""
    from fastctx.sglang_plugin import settings

    namespace = args[-1] if args else kwargs.get("args")
    text = getattr(namespace, "fastctx_config", None)
    # A bad config stops the launch here, with its message (SGLang logs and skips a plugin whose
    # registration raises, which would hide it behind "invalid choice: 'fastctx'").
    if text:
        settings.set_config(text)
    uses_fastctx = BACKEND in {getattr(namespace, f, None) for f in
                               ("attention_backend", "prefill_attention_backend", "decode_attention_backend")}
    if uses_fastctx and not text:
        settings.runtime_config()
    if uses_fastctx and getattr(namespace, "speculative_algorithm", None):
        # Verification batches carry a tree mask; torch_native, where they would go, cannot compute them.
        raise ValueError(f"--attention-backend {BACKEND} has no speculative verification path (tree masks) yet; "
                         "drop --speculative-algorithm, or serve speculative decoding with another backend")
    return None


def _report_density(result, *_args, **_kwargs):
    """Adds each fastctx runtime's cumulative density counts to the scheduler's state report."""
    from fastctx.sglang_plugin.backend import RUNTIMES

    if RUNTIMES:
        result.internal_state["fastctx"] = [row for runtime in RUNTIMES for row in runtime.density()]
    return result
