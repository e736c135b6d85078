"""SCBench-style shared-context evaluation harness and the ``fastctx-eval`` CLI (issue: evaluation)."""
