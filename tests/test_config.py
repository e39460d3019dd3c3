"""Config validation: every mistake stops start-up with a message naming the bad key."""
import subprocess
import sys

import pytest

from gateway.config import ConfigError, load_config, parse_config

from conftest import ROOT, load_yaml_config, write_config


def parse(data):
    return parse_config(data, ROOT)


def test_default_config_is_valid_and_complete():
    config = load_config(ROOT / "gateway.yaml")
    assert config.server.default_model == "efficientnet_lite0"
    assert config.backends["embedded"].kind == "embedded"
    mobilenet = config.models["mobilenet_v2"]
    assert mobilenet.routes[0].backend == "embedded"
    tf_route = next(r for r in mobilenet.routes if r.name == "triton-tf")
    # the torch weights converted to TF: the model's own scaling, only in NHWC
    assert tf_route.preprocess.layout == "NHWC" and tf_route.preprocess.scaling == mobilenet.preprocess.scaling
    assert tf_route.preprocess.size == (224, 224)  # inherited from the model
    assert tf_route.output == "probabilities"
    assert len(mobilenet.labels) == 1000 and mobilenet.labels[285] == "Egyptian cat"


def mutate(path: str, value):
    """Set (or with value=KeyError, delete) a dotted path in a fresh copy of gateway.yaml."""
    data = load_yaml_config()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path,value,named", [
    ("server.max_body_bytes", -1, "server.max_body_bytes"),
    ("server.default_top_k", "five", "server.default_top_k"),
    ("server.colour", "blue", "server.colour"),
    ("server.default_model", "resnet", "server.default_model"),
    ("backends.triton.kind", "kserve", "backends.triton.kind"),
    ("backends.triton.url", "localhost:8010", "backends.triton.url"),
    ("backends.triton.timeout_s", 0, "backends.triton.timeout_s"),
    ("backends.embedded.threads", 4, "backends.embedded.threads"),
    ("backends.triton.pool_size", "many", "backends.triton.pool_size"),
    ("backends.embedded.model_dir", 3, "backends.embedded.model_dir"),
    ("models.efficientnet_lite0.output", "scores", "models.efficientnet_lite0.output"),
    ("models.efficientnet_lite0.labels", "nowhere.txt", "models.efficientnet_lite0.labels"),
    ("models.efficientnet_lite0.routes", [], "models.efficientnet_lite0.routes"),
    ("models.efficientnet_lite0.preprocess.layout", "NWHC", "models.efficientnet_lite0.preprocess.layout"),
    ("models.efficientnet_lite0.preprocess.sizes", [1, 2], "models.efficientnet_lite0.preprocess.sizes"),
    ("models.mobilenet_v2.routes.0.backend", "onnx", "models.mobilenet_v2.routes[0].backend"),
    ("models.mobilenet_v2.routes.1.name", "embedded", "models.mobilenet_v2.routes[1].name"),
    ("models.mobilenet_v2.routes.3.preprocess.scaling", "caffe", "models.mobilenet_v2.routes[3].preprocess.scaling"),
])
def test_bad_key_or_value_is_named(path, value, named):
    with pytest.raises(ConfigError) as info:
        parse(mutate(path, value))
    assert str(info.value).startswith(named), str(info.value)


def test_top_level_and_type_errors():
    with pytest.raises(ConfigError, match=r"^extra: unknown key \(allowed: server, backends, models\), got 1"):
        parse({**load_yaml_config(), "extra": 1})
    with pytest.raises(ConfigError, match="backends: expected a mapping"):
        parse({**load_yaml_config(), "backends": [1, 2]})


def test_weights_come_from_the_build_manifest(tmp_path):
    data = load_yaml_config()
    manifest = tmp_path / "artifacts.json"
    manifest.write_text('{"models": {"mobilenet_v2": {"weights": "random"}}}')
    data["server"]["artifacts"] = str(manifest)
    config = parse(data)
    assert config.models["mobilenet_v2"].weights == "random"
    assert config.models["efficientnet_lite0"].weights == "unknown"


def test_serve_refuses_to_start_on_a_bad_config():
    bad = write_config(mutate("backends.triton.kind", "kserve"))
    try:
        proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad), "--port", "1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        bad.unlink()
    assert proc.returncode == 2
    assert "backends.triton.kind" in proc.stderr


def test_yaml_syntax_error_is_reported(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("path,value,message", [
    ("backends.tfserving.protocol", "soap", "backends.tfserving.protocol: expected 'rest' or 'grpc', got 'soap'"),
    ("backends.triton.timeout_s", "30", "backends.triton.timeout_s: input should be a valid number, got '30'"),
    ("backends.embedded.intra_op_threads", -1,
     "backends.embedded.intra_op_threads: input should be greater than or equal to 0, got -1"),
    ("models.efficientnet_lite0.preprocess.resize", "zoom",
     "models.efficientnet_lite0.preprocess.resize: "
     "expected one of ['center_crop', 'letterbox', 'stretch'], got 'zoom'"),
    ("server.colour", "blue", "server.colour: unknown key (allowed: default_model, default_top_k"),
])
def test_errors_name_the_key_what_was_expected_and_what_was_given(path, value, message):
    """Before the backend kinds declared typed settings, a bad protocol was a ValueError at
    worker boot and messages glued the location to Python's text ("...preprocess.invalid literal")."""
    with pytest.raises(ConfigError) as info:
        parse(mutate(path, value))
    assert str(info.value).startswith(message), str(info.value)


def test_renamed_keys_still_work_with_a_deprecation_message():
    data = load_yaml_config()
    route = data["models"]["mobilenet_v2"]["routes"][1]
    route["model"] = route.pop("backend_model")
    route["input"] = "input__0"
    data["backends"]["torchserve"]["max_batch"] = 4
    config = parse(data)
    assert config.models["mobilenet_v2"].routes[1].backend_model == "torchmobilenet"
    assert config.models["mobilenet_v2"].routes[1].input_name == "input__0"
    assert config.backends["torchserve"].max_batch_size == 4
    assert config.deprecations == (
        "backends.torchserve.max_batch is deprecated: call it max_batch_size",
        "models.mobilenet_v2.routes[1].model is deprecated: call it backend_model",
        "models.mobilenet_v2.routes[1].input is deprecated: call it input_name")


def test_paths_resolve_against_the_config_file_and_extends_merges(tmp_path):
    (tmp_path / "key_file.json").write_text("{}")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {ROOT / 'gateway.yaml'}\n"
                     "backends:\n  torchserve:\n    token_file: key_file.json\n  embedded:\n    model_dir: models\n")
    config = load_config(child)
    assert config.backends["torchserve"].token_file == tmp_path / "key_file.json"
    assert config.backends["embedded"].model_dir == tmp_path / "models"
    assert config.backends["torchserve"].url == "http://127.0.0.1:8080"  # from the base file
    assert config.server.artifacts == ROOT / "artifacts.json"  # the base's relative path, against its folder
    assert set(config.models) == {"efficientnet_lite0", "mobilenet_v2", "yolox_nano"}


def test_extends_removes_a_key_set_to_null(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {ROOT / 'gateway.yaml'}\nbackends:\n  tfserving: null\n"
                     "models:\n  efficientnet_lite0:\n    routes: [{backend: embedded}]\n  mobilenet_v2: null\n")
    config = load_config(child)
    assert "tfserving" not in config.backends and "mobilenet_v2" not in config.models
    assert [r.name for r in config.models["efficientnet_lite0"].routes] == ["embedded"]
    assert config.models["efficientnet_lite0"].preprocess.scaling == "efficientnet_lite"  # still the base's
