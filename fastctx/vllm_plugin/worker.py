"""Worker extension: lets the engine's owner read what the fastctx backend measured.

Pass ``worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension"``
(``--worker-extension-cls`` on the server), then ``llm.collective_rpc("fastctx_density")``.
"""

from __future__ import annotations


class FastctxWorkerExtension:
    def fastctx_density(self, reset: bool = False) -> list[dict]:
        """Achieved attention density of each fastctx prefill method in this worker;
        ``reset`` starts the counts afresh after reading them."""
        from fastctx.vllm_plugin.attention import density_stats

        return density_stats(reset=reset)
