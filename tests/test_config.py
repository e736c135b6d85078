import re
from pathlib import Path

import pytest

from fastctx import methods
from fastctx.config import ENGINE, FastctxConfig, FastctxConfigError, config_reference


def test_defaults_without_section():
    assert FastctxConfig.from_additional_config({}) == FastctxConfig(attention="dense", decode=ENGINE)
    assert FastctxConfig.from_additional_config({"other_plugin": {"x": 1}}).attention == "dense"


@pytest.mark.parametrize("method", methods.names("prefill"))
def test_every_prefill_method_is_accepted(method):
    assert FastctxConfig.from_section({"attention": method}).attention == method


@pytest.mark.parametrize("method", [ENGINE, *methods.names("decode")])
def test_every_decode_method_combines_with_any_prefill_method(method):
    for prefill in methods.names("prefill"):
        cfg = FastctxConfig.from_section({"attention": prefill, "decode": method})
        assert (cfg.attention, cfg.decode) == (prefill, method)


@pytest.mark.parametrize("section,message", [
    ({"atention": "dense"},
     "fastctx config: unknown key 'atention'; allowed keys: attention, decode, dense_below, flexprefill, "
     "lserve, minference, streaming"),
    ({"attention": "magic"}, "fastctx config: attention='magic' is not a fastctx prefill method; choose one of: "
     "dense, flexprefill, lserve, minference, streaming"),
    ({"decode": "minference"}, "fastctx config: decode='minference' is not a decode method; choose one of: "
     "engine, dense, lserve, streaming"),
    ("dense", "must be a JSON object"),
    ({"dense_below": -1}, "fastctx config: dense_below=-1 must be a token count >= 0"),
    ({"minference": {"v": 3}},
     "fastctx config: unknown key minference.'v'; allowed keys: pattern_config, last_q, v_size, s_size, block_size"),
    ({"minference": {"block_size": 48}}, "fastctx config: minference.block_size=48 must be 16, 32, 64 or 128"),
    ({"minference": {"last_q": 0}}, "fastctx config: minference.last_q=0 must be >= 1 (MInference uses 64)"),
    ({"minference": {"pattern_config": "/nonexistent.json"}},
     "fastctx config: minference.pattern_config='/nonexistent.json' is not a file; create one with "
     "`fastctx minference search`"),
    ({"flexprefill": {"gamma": 1.5}}, "fastctx config: flexprefill.gamma=1.5 must be in (0, 1]"),
    ({"lserve": {"head_scores": "/nonexistent.json"}},
     "fastctx config: lserve.head_scores='/nonexistent.json' is not a file; create one with "
     "`fastctx lserve calibrate`"),
    ({"lserve": {"token_budget": 100}},
     "fastctx config: lserve.token_budget=100 must hold at least two pages of page_size=64 (LServe uses 4096)"),
    ({"flexprefill": {"gamma": "high"}}, "fastctx config: flexprefill.gamma='high' must be in (0, 1]"),
    ({"flexprefill": {"block_selection": "tokens"}},
     "fastctx config: flexprefill.block_selection='tokens' must be one of block_mass, token_count"),
    ({"flexprefill": []}, "fastctx config: flexprefill must be a JSON object of knobs"),
    ({"streaming": {"local": 0}}, "fastctx config: streaming.local=0 must be a token count >= 1"),
    ({"streaming": {"sink": -4}}, "fastctx config: streaming.sink=-4 must be a token count >= 0"),
])
def test_bad_config_names_the_problem_once(section, message):
    with pytest.raises(FastctxConfigError) as info:
        FastctxConfig.from_section(section)
    assert message in str(info.value)
    assert str(info.value).count("fastctx config") == 1


def test_knob_defaults_come_from_the_papers():
    cfg = FastctxConfig.from_section({"attention": "flexprefill", "flexprefill": {"gamma": 0.95}})
    assert (cfg.flexprefill.gamma, cfg.flexprefill.tau, cfg.flexprefill.block_size) == (0.95, 0.1, 128)
    assert (cfg.minference.last_q, cfg.minference.v_size, cfg.minference.s_size) == (64, 1000, 6096)
    assert (cfg.streaming.sink, cfg.streaming.local) == (128, 3968)


def test_equal_sections_give_equal_hashable_configs():
    a = FastctxConfig.from_section({"attention": "minference", "minference": {"v_size": 3}})
    b = FastctxConfig.from_section({"minference": {"v_size": 3}, "attention": "minference"})
    assert a == b and hash(a) == hash(b) and a != FastctxConfig.from_section({"attention": "minference"})
    assert a.as_dict()["minference"]["v_size"] == 3 and a.as_dict()["decode"] == ENGINE


def test_every_method_knob_is_documented_and_validated():
    for name, cls in methods.registered().items():
        assert cls.summary and cls.phases
        if cls.Params is not None:
            from dataclasses import fields

            assert all(f.metadata.get("doc") for f in fields(cls.Params)), name
            cls.Params()  # defaults are valid


def test_readme_config_reference_is_the_generated_one():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->",
                      readme.read_text(), re.S)
    assert block, "README lacks the generated config reference"
    assert block.group(1) == config_reference(), "README's config reference is stale: run `fastctx config-reference`"


@pytest.mark.engine
@pytest.mark.parametrize("overrides,needle", [
    (dict(attention_config={"backend": "CUSTOM"}, additional_config={"fastctx": {"atention": "dense"}}),
     "unknown key 'atention'"),
    (dict(attention_config={"backend": "CUSTOM"}, additional_config={"fastctx": {"attention": "nope"}}),
     "attention='nope'"),
    (dict(additional_config={"fastctx": {"attention": "dense"}}), "add --attention-backend CUSTOM"),
    (dict(attention_config={"backend": "CUSTOM"}, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker"),
     "is not fastctx's worker"),
])
def test_engine_refuses_to_start_on_bad_config(vllm_available, model_dir, overrides, needle):
    from vllm.engine.arg_utils import EngineArgs

    from tests.conftest import engine_kwargs

    args = EngineArgs(**engine_kwargs(model_dir, **overrides))
    with pytest.raises(Exception, match=needle) as info:
        args.create_engine_config()
    assert "fastctx config" in str(info.value)


def test_vllm_version_check_says_what_to_install():
    from fastctx.vllm_plugin import version_problem

    assert version_problem("0.32.0") is None and version_problem("0.32.7") is None
    message = version_problem("0.33.1")
    assert "written for vLLM 0.32.x" in message and "install vllm==0.32.*" in message
