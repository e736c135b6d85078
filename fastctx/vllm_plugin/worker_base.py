"""What fastctx's vLLM workers add on every device: after the model loads, every fastctx attention
layer gets the engine's ``AttentionRuntime`` and its index among the engine's attention layers;
before each step the state of finished and preempted requests is freed.

``FastctxWorkerExtension`` lets the engine's owner read what the runtime
measured: ``llm.collective_rpc("fastctx_density")``, or with
``VLLM_SERVER_DEV_MODE=1`` ``POST /collective_rpc {"method": "fastctx_density",
"args": ["reset"]}``. Passing it as ``--worker-extension-cls`` is harmless with
fastctx's worker (which already has it) and answers ``[]`` on a stock worker.
"""

from __future__ import annotations

from fastctx.models.sambay.config import ARCHITECTURE as SAMBAY_ARCHITECTURE

# The model this worker process loaded: stock vLLM never hands it to a KV connector, and
# CacheBlend's connector runs its layers.
_loaded_model = None


def loaded_model():
    if _loaded_model is None:
        raise RuntimeError("cacheblend: the model is not reachable from the connector; run fastctx's worker "
                           "(leave --worker-cls at auto, or subclass fastctx's worker for the device)")
    return _loaded_model


def _kv_connector():
    """This worker's KV connector, or None."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


class FastctxWorkerExtension:
    def fastctx_density(self, reset: bool | str = False) -> list[dict]:
        """Achieved attention density per phase fastctx handled in this worker; ``reset`` (True, or
        the string "reset" over HTTP, which carries only strings) starts the counts afresh."""
        runtime = getattr(self, "fastctx_runtime", None)
        return runtime.density(reset=reset in (True, "reset")) if runtime is not None else []

    def fastctx_kv_footprint(self, seq_len: int | str) -> dict:
        """What this engine's KV cache holds for one sequence of ``seq_len`` tokens
        (``fastctx.vllm_plugin.kv_footprint``)."""
        from fastctx.vllm_plugin.kv_footprint import kv_footprint

        return kv_footprint(self.get_kv_cache_spec(), int(seq_len))

    def fastctx_live_requests(self) -> list[str]:
        """Requests holding per-request method state in this worker."""
        runtime = getattr(self, "fastctx_runtime", None)
        return runtime.states.live() if runtime is not None else []

    def fastctx_blend_stats(self, reset: bool | str = False) -> dict:
        """CacheBlend's counts in this worker (chunks hit/missed, tokens reused/recomputed, seconds);
        ``{}`` without fastctx's connector."""
        stats = getattr(_kv_connector(), "stats", None)
        return stats.summary(reset=reset in (True, "reset")) if stats is not None else {}

    def fastctx_spectr_stats(self, reset: bool | str = False) -> dict:
        """SpecTr's counts in this worker (verification steps, tokens, accepted drafts, request steps left
        without drafts, the (depth, chains) arms run, Scylla's fitted law); ``{}`` without fastctx's SpecTr
        proposer. vLLM's own spec-decode metrics count
        every verified token as an accepted draft."""
        from fastctx.vllm_plugin.spectr import SpecTrProposer

        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        return drafter.summary(reset=reset in (True, "reset")) if isinstance(drafter, SpecTrProposer) else {}

    def fastctx_spectr_check(self, on: bool | str = True) -> bool:
        """Compare SpecTr's target distribution with vLLM's logits for every token verified ahead (k >= 2
        chains) from now on (``fastctx_spectr_stats`` then reports ``logit_gap_max``); False without
        fastctx's proposer."""
        from fastctx.vllm_plugin.spectr import SpecTrProposer

        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        if not isinstance(drafter, SpecTrProposer):
            return False
        drafter.record = on in (True, "on")
        drafter.gaps.clear()
        return True

    def fastctx_blend_format(self) -> dict:
        """What this worker's chunk keys cover (weights fingerprint, dtype, layers, KV heads, head_dim), as
        a process sharing its store needs them; ``{}`` without the connector."""
        from dataclasses import asdict

        worker = getattr(_kv_connector(), "_worker", None)
        return asdict(worker.fmt) if worker is not None else {}


class FastctxWorker:
    """Mixed in front of vLLM's worker class for a device: ``class W(FastctxWorker, VllmWorker,
    FastctxWorkerExtension)``; the extension is a direct base because vLLM looks only there when
    ``--worker-extension-cls`` names it too."""


    fastctx_runtime = None

    def load_model(self, *args, **kwargs):
        from fastctx.vllm_plugin.impl_base import bind_attention_layers

        global _loaded_model
        from fastctx.vllm_plugin.spectr import SpecTrProposer

        result = super().load_model(*args, **kwargs)
        _loaded_model = self.model_runner.model
        drafter = getattr(self.model_runner, "drafter", None)
        if isinstance(drafter, SpecTrProposer):
            drafter.attach(self.model_runner)
        self.fastctx_runtime = bind_attention_layers(self.vllm_config, self.model_runner)
        if self.fastctx_runtime is None and self.vllm_config.model_config.architecture == SAMBAY_ARCHITECTURE:
            from fastctx.vllm_plugin.sambay import bind_full_attention_layer

            self.fastctx_runtime = bind_full_attention_layer(self.vllm_config, self.model_runner)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs):
        if self.fastctx_runtime is not None:
            done = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
            if done:
                self.fastctx_runtime.free(done)
        return super().execute_model(scheduler_output, *args, **kwargs)
