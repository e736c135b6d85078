"""SCBench-style shared-context evaluation (``fastctx-eval``) and fidelity checks against dense.

tasks -> prompts -> runner (server, client, store) -> report (agreement)."""
