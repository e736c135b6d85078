"""Worker extension: lets the engine's owner read what the fastctx backend measured.

Pass ``worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension"``
(``--worker-extension-cls`` on the server), then ``llm.collective_rpc("fastctx_density")``;
a server started with ``VLLM_SERVER_DEV_MODE=1`` answers
``POST /collective_rpc {"method": "fastctx_density", "args": ["reset"]}``.
"""

from __future__ import annotations


class FastctxWorkerExtension:
    def fastctx_density(self, reset: bool | str = False) -> list[dict]:
        """Achieved attention density of each fastctx prefill method in this worker;
        ``reset`` (True, or the string "reset" over HTTP, which carries only strings)
        starts the counts afresh after reading them."""
        from fastctx.vllm_plugin.attention import density_stats

        return density_stats(reset=reset in (True, "reset"))
