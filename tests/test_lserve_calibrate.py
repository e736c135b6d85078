"""`fastctx lserve calibrate` on the embedded model: a file that LServe loads for this model."""

import json

import pytest

from fastctx.cli import main
from fastctx.methods import ModelShape
from fastctx.methods.lserve import DEFAULT_MODEL_HEADS, LServeParams, load_head_scores, streaming_kv_heads

SMOLLM2 = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


def test_calibrate_writes_scores_lserve_loads(model_dir, tmp_path):
    out = tmp_path / "heads.json"
    assert main(["lserve", "calibrate", "--model", model_dir, "--out", str(out), "--tokens", "800",
                 "--sink", "64", "--local", "128"]) == 0
    data = json.loads(out.read_text())
    assert (data["num_layers"], data["num_kv_heads"], data["sink"], data["local"]) == (30, 3, 64, 128)
    scores = load_head_scores(out, SMOLLM2)
    assert ((scores > 0) & (scores < 1)).all() and scores.std() > 0.01
    streaming = streaming_kv_heads(LServeParams(head_scores=str(out)), SMOLLM2)
    assert streaming.sum() == 45 and (scores[streaming].max() <= scores[~streaming].min())


def test_shipped_calibration_fits_the_default_model():
    assert load_head_scores(DEFAULT_MODEL_HEADS, SMOLLM2).shape == (30, 3)


def test_too_short_samples_are_refused(model_dir, tmp_path, capsys):
    assert main(["lserve", "calibrate", "--model", model_dir, "--out", str(tmp_path / "x.json"),
                 "--tokens", "500"]) == 1
    assert "must exceed twice sink + local" in capsys.readouterr().err


@pytest.mark.parametrize("fraction,count", [(0.25, 22), (1.0, 90)])
def test_fraction_picks_that_share_of_kv_heads(fraction, count):
    assert streaming_kv_heads(LServeParams(streaming_fraction=fraction, head_scores=str(DEFAULT_MODEL_HEADS)),
                              SMOLLM2).sum() == count
