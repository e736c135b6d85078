"""Teacher-forced fidelity with decode steps: the engine-free harness runs a decode method row by row."""

import pytest

from fastctx.methods.lserve import DEFAULT_MODEL_HEADS

LSERVE = {"attention": "lserve", "decode": "lserve", "dense_below": 0}


@pytest.fixture(scope="module")
def model_and_ids(model_dir):
    from transformers import AutoTokenizer

    from fastctx.eval import fidelity
    from fastctx.eval.texts import prompt_token_ids

    return fidelity.load_model(model_dir), prompt_token_ids(AutoTokenizer.from_pretrained(model_dir), 700)


def test_decode_rows_at_full_budget_equal_dense(model_and_ids):
    from fastctx.eval import fidelity

    model, ids = model_and_ids
    section = {**LSERVE, "lserve": {"head_scores": str(DEFAULT_MODEL_HEADS), "token_budget": 1024,
                                    "decode_local": 1024, "prefill_local": 1024}}
    row = fidelity.compare(model, ids, section, last=32, decode_rows=16)
    assert row["decode_rows"] == 16 and row["decode_density"] == 1.0
    assert row["decode_top1_agree"] == 1.0 and row["decode_kl_nats"] < 1e-6 and row["top1_agree"] == 1.0


def test_sparse_decode_rows_report_density_recall_and_agreement(model_and_ids):
    from fastctx.eval import fidelity

    model, ids = model_and_ids
    section = {**LSERVE, "lserve": {"head_scores": str(DEFAULT_MODEL_HEADS), "token_budget": 128, "page_size": 32,
                                    "decode_sink": 16, "decode_local": 64}}
    row = fidelity.compare(model, ids, section, last=32, decode_rows=16)
    assert 0.05 < row["decode_density"] < 0.4
    assert 0.3 < row["decode_recall"] < 1.0
    assert 0 <= row["decode_top1_agree"] <= 1 and row["decode_kl_nats"] > 0


def test_decode_rows_need_a_decode_method(model_and_ids):
    from fastctx.eval import fidelity

    model, ids = model_and_ids
    with pytest.raises(ValueError, match="decode method"):
        fidelity.compare(model, ids, {"attention": "dense"}, last=32, decode_rows=8)
