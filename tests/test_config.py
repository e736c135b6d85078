import pytest

from fastctx.config import ATTENTION_METHODS, FastctxConfig, FastctxConfigError


def test_defaults_without_section():
    assert FastctxConfig.from_additional_config({}) == FastctxConfig(attention="dense")
    assert FastctxConfig.from_additional_config({"other_plugin": {"x": 1}}).attention == "dense"


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_every_method_is_accepted(method):
    assert FastctxConfig.from_section({"attention": method}).attention == method


@pytest.mark.parametrize("section,needle", [
    ({"atention": "dense"}, "unknown key 'atention'; allowed keys: attention"),
    ({"attention": "magic"}, "attention='magic' is not a fastctx attention method; choose one of: dense"),
    ("dense", "must be a JSON object"),
])
def test_bad_config_names_the_problem(section, needle):
    with pytest.raises(FastctxConfigError, match=needle.replace("(", r"\(")):
        FastctxConfig.from_section(section)


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
