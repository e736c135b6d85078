"""SGLang adapter: fastctx's attention methods behind ``--attention-backend fastctx``.

The method and its knobs are the same JSON section as vLLM's ``fastctx`` config, passed
as ``--fastctx-config '{...}'`` (a flag this plugin adds to SGLang's parser) or in the
environment variable ``FASTCTX_SGLANG_CONFIG`` (for ``sglang.Engine``).

``register`` is the ``sglang.srt.plugins`` entry point; SGLang calls it in the
launching process (for argument parsing) and in each scheduler process (where the
backend is built). It also registers SpecTr as ``--speculative-algorithm SPECTR``
(``fastctx.sglang_plugin.spectr``, knobs in ``--fastctx-spectr``). Every algorithm lives in
``fastctx.core``, ``fastctx.methods``, ``fastctx.kernels`` and ``fastctx.specdec``, shared
with the vLLM adapter.
"""

from __future__ import annotations

BACKEND = "fastctx"
SPECTR = "SPECTR"
# Speculative algorithms whose only extra passes are TARGET_VERIFY trees, which the backend verifies.
DRAFT_FREE = ("NGRAM", SPECTR)
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

    _register_spectr()
    HookRegistry.register(STATE_REPORT, _report_density, HookType.AFTER)
    HookRegistry.register(SERVER_ARGS + ".add_cli_args", _add_flag, HookType.AFTER)
    HookRegistry.register(SERVER_ARGS + ".from_cli_args", _take_flag, HookType.BEFORE)


def _add_flag(result, parser, *_args, **_kwargs):
    parser.add_argument("--fastctx-config", default=None, metavar="JSON",
                        help="fastctx's config section for --attention-backend fastctx, e.g. "
                             '\'{"attention": "flexprefill", "decode": "streaming"}\' (sets FASTCTX_SGLANG_CONFIG)')
    parser.add_argument("--fastctx-spectr", default=None, metavar="JSON",
                        help="SpecTr's knobs for --speculative-algorithm SPECTR, e.g. '{\"chains\": 4}' "
                             "(sets FASTCTX_SGLANG_SPECTR)")
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
    algorithm = (getattr(namespace, "speculative_algorithm", None) or "").upper()
    if algorithm:
        _check_speculative(namespace, algorithm, uses_fastctx)
    return None


def _check_speculative(namespace, algorithm: str, uses_fastctx: bool) -> None:
    from fastctx.config import ENGINE
    from fastctx.sglang_plugin import settings

    if algorithm == SPECTR and not uses_fastctx:
        raise ValueError(f"--speculative-algorithm {SPECTR} verifies its trees in fastctx's backend; "
                         f"add --attention-backend {BACKEND}")
    if uses_fastctx and algorithm not in DRAFT_FREE:
        raise ValueError(f"--attention-backend {BACKEND} verifies draft trees but does not run draft models; "
                         f"use --speculative-algorithm {' or '.join(DRAFT_FREE)}, or another backend")
    if uses_fastctx and settings.runtime_config().decode != ENGINE:
        raise ValueError(f"--speculative-algorithm {algorithm} verifies with dense reads, so a fastctx decode method "
                         "would decode differently from its verification; drop \"decode\" from --fastctx-config")
    if algorithm == SPECTR:
        params = settings.set_spectr(getattr(namespace, "fastctx_spectr", None))
        n = getattr(namespace, "speculative_num_draft_tokens", None)
        if not n or n < 1 + params.chains or (n - 1) % params.chains:
            raise ValueError(f"--speculative-algorithm {SPECTR} with {params.chains} chains needs "
                             f"--speculative-num-draft-tokens = 1 + {params.chains} x depth (e.g. "
                             f"{1 + 2 * params.chains} for depth 2), got {n}")


def _register_spectr() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo, get_spec

    if get_spec(SPECTR) is not None:
        return

    class SpecTrAlgo(CustomSpecAlgo):
        """Draft-free like NGRAM, whose scheduler branches it takes; adds what SGLang's custom-algorithm
        class lacks beside the builtin enum (0.5.23)."""

        def is_ngram(self) -> bool:
            return True

        def has_draft_kv(self) -> bool:
            return False

        def handle_server_args(self, server_args) -> None:
            SpeculativeAlgorithm.NGRAM.handle_server_args(server_args)

        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def get_platform_worker_cls(self):
            return None

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

    @SpeculativeAlgorithm.register(SPECTR, spec_class=SpecTrAlgo)
    def _worker(_server_args):
        from fastctx.sglang_plugin.spectr import SpecTrWorker

        return SpecTrWorker


def _report_density(result, *_args, **_kwargs):
    """Adds each fastctx runtime's cumulative density counts, and SpecTr's arms and Scylla's law, to the
    scheduler's state report."""
    import sys

    from fastctx.sglang_plugin.backend import RUNTIMES

    if RUNTIMES:
        result.internal_state["fastctx"] = [row for runtime in RUNTIMES for row in runtime.density()]
    spectr = sys.modules.get("fastctx.sglang_plugin.spectr")  # loaded where SPECTR runs
    if spectr is not None and spectr.WORKERS:
        result.internal_state["fastctx_spectr"] = [worker.summary() for worker in spectr.WORKERS]
    return result
