"""fastctx config sections and prompts that the engine tests of every engine share."""

from fastctx.eval.texts import natural_text
from fastctx.methods.lserve import DEFAULT_MODEL_HEADS

TEXT = natural_text()
PROMPTS = [TEXT[30000:34000], TEXT[50000:55000], "The capital of France is"]

FULL_BUDGET = {
    "minference": {"attention": "minference", "dense_below": 0},  # (1000, 6096) >= these lengths
    "flexprefill": {"attention": "flexprefill", "dense_below": 0,
                    "flexprefill": {"gamma": 1.0, "min_budget": 8192}},
    # A window longer than every context reads everything, in prefill and decode.
    "streaming": {"attention": "streaming", "decode": "streaming", "streaming": {"sink": 4, "local": 2048}},
    # A budget over every context and windows longer than it: LServe's index reads everything.
    "lserve": {"attention": "lserve", "decode": "lserve", "dense_below": 0,
               "lserve": {"head_scores": str(DEFAULT_MODEL_HEADS), "token_budget": 4096, "prefill_local": 2048,
                          "decode_local": 2048}},
}
DECODE_METHODS = ("streaming", "lserve")
SPARSE = {
    "minference": {"attention": "minference", "dense_below": 0, "minference": {"v_size": 30, "s_size": 100}},
    "streaming": {"attention": "streaming", "decode": "streaming", "streaming": {"sink": 16, "local": 256}},
    "lserve": {"attention": "lserve", "decode": "lserve", "dense_below": 0,
               "lserve": {"head_scores": str(DEFAULT_MODEL_HEADS), "token_budget": 256, "decode_sink": 16,
                          "decode_local": 64, "prefill_sink": 16, "prefill_local": 256}},
}
