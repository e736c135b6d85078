import pytest

from fastctx.config import ATTENTION_METHODS, FastctxConfig, FastctxConfigError


def test_defaults_without_section():
    assert FastctxConfig.from_additional_config({}) == FastctxConfig(attention="dense")
    assert FastctxConfig.from_additional_config({"other_plugin": {"x": 1}}).attention == "dense"


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_every_method_is_accepted(method):
    assert FastctxConfig.from_section({"attention": method}).attention == method


@pytest.mark.parametrize("section,needle", [
    ({"atention": "dense"}, "unknown key 'atention'; allowed keys: attention, dense_below"),
    ({"attention": "magic"},
     "attention='magic' is not a fastctx attention method; choose one of: dense, minference, flexprefill"),
    ("dense", "must be a JSON object"),
    ({"dense_below": -1}, "dense_below=-1 must be a token count >= 0"),
    ({"minference": {"v": 3}},
     "unknown key minference.'v'; allowed keys: pattern_config, last_q, v_size, s_size, block_size"),
    ({"minference": {"block_size": 48}}, "minference block_size=48 must be 16, 32, 64 or 128"),
    ({"minference": {"last_q": 0}}, "minference: minference last_q=0 must be >= 1"),
    ({"minference": {"pattern_config": "/nonexistent.json"}}, "is not a file; create one with `fastctx minference search`"),
    ({"flexprefill": {"gamma": 1.5}}, "flexprefill gamma=1.5 must be in"),
    ({"flexprefill": {"block_selection": "tokens"}},
     "flexprefill block_selection='tokens' must be one of block_mass, token_count"),
    ({"flexprefill": []}, "flexprefill must be a JSON object of knobs"),
])
def test_bad_config_names_the_problem(section, needle):
    with pytest.raises(FastctxConfigError) as info:
        FastctxConfig.from_section(section)
    assert needle in str(info.value)


def test_knob_defaults_come_from_the_papers():
    cfg = FastctxConfig.from_section({"attention": "flexprefill", "flexprefill": {"gamma": 0.95}})
    assert (cfg.flexprefill.gamma, cfg.flexprefill.tau, cfg.flexprefill.block_size) == (0.95, 0.1, 128)
    assert (cfg.minference.last_q, cfg.minference.v_size, cfg.minference.s_size) == (64, 1000, 6096)


@pytest.mark.engine
@pytest.mark.parametrize("overrides,needle", [
    (dict(attention_config={"backend": "CUSTOM"}, additional_config={"fastctx": {"atention": "dense"}}),
     "unknown key 'atention'"),
    (dict(attention_config={"backend": "CUSTOM"}, additional_config={"fastctx": {"attention": "nope"}}),
     "attention='nope'"),
    (dict(additional_config={"fastctx": {"attention": "dense"}}), "add --attention-backend CUSTOM"),
])
def test_engine_refuses_to_start_on_bad_config(vllm_available, model_dir, overrides, needle):
    from vllm.engine.arg_utils import EngineArgs

    from tests.conftest import engine_kwargs

    args = EngineArgs(**engine_kwargs(model_dir, **overrides))
    with pytest.raises(Exception, match=needle) as info:
        args.create_engine_config()
    assert "fastctx config" in str(info.value)
