"""params.yaml validation: every key in SCHEMA, bad values, unknown and repeated keys, and failing fast under DVC."""

import math
import time

import pytest
import yaml

from rsft.errors import ParamsError
from rsft.params import MAX_SEED, SCHEMA, Spec, flatten, load_params, validate
from tests.conftest import REPO_ROOT, run

# Same-typed values tried against each key's check; the first one the check
# rejects is that key's out-of-range case.
OUT_OF_RANGE_CANDIDATES = {
    int: (-1, 0, 1, MAX_SEED + 1),
    float: (-1.0, 1.5, 101.0, math.inf, math.nan),
    str: ("", "   ", "not-a-valid-choice"),
    bool: (),
}
# A value of the wrong type for each kind of key.
WRONG_TYPE = {int: "three", float: "high", str: 3, bool: "maybe"}


def default_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_value(params: dict, key: str, value) -> dict:
    flat = flatten(params)
    flat[key] = value
    tree: dict = {}
    for dotted, item in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = item
    return tree


def out_of_range(spec: Spec):
    for candidate in OUT_OF_RANGE_CANDIDATES[spec.kind]:
        if not spec.check(candidate):
            return candidate
    return None


def invalid_cases() -> list:
    cases = []
    for key, spec in SCHEMA.items():
        cases.append(pytest.param(key, WRONG_TYPE[spec.kind], id=f"{key}-type"))
        value = out_of_range(spec)
        if value is not None:
            cases.append(pytest.param(key, value, id=f"{key}-range"))
    return cases


def test_schema_covers_params_yaml():
    assert set(flatten(default_params())) == set(SCHEMA)


def test_default_params_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert set(flatten(params)) == set(SCHEMA)


@pytest.mark.parametrize("key", [key for key, spec in SCHEMA.items() if spec.kind in (int, float)])
def test_numeric_keys_have_range(key):
    assert out_of_range(SCHEMA[key]) is not None, f"{key} accepts every candidate; give it a range"


@pytest.mark.parametrize("key, value", invalid_cases())
def test_invalid_value_message(key, value):
    with pytest.raises(ParamsError) as raised:
        validate(with_value(default_params(), key, value), source="params.yaml")
    message = str(raised.value)
    assert "params.yaml" in message
    assert f"{key}: invalid value {value!r}" in message
    assert SCHEMA[key].allowed in message


def test_unknown_key_suggests_closest():
    params = default_params()
    params["train_gan"]["epoch"] = params["train_gan"].pop("epochs")
    with pytest.raises(ParamsError) as raised:
        validate(params)
    assert "train_gan.epoch: unknown key; did you mean 'train_gan.epochs'?" in str(raised.value)


def test_missing_key_reported():
    params = default_params()
    del params["score"]["calibration"]
    with pytest.raises(ParamsError) as raised:
        validate(params)
    assert f"score.calibration: missing; expected {SCHEMA['score.calibration'].allowed}" in str(raised.value)


def test_all_problems_listed_at_once():
    params = with_value(with_value(default_params(), "threshold", 2.0), "device", "gpu")
    with pytest.raises(ParamsError) as raised:
        validate(params)
    assert "2 invalid parameter(s)" in str(raised.value)


def test_duplicate_key_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text() + "\nthreshold: 0.3\n")
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert "key 'threshold' appears twice" in str(raised.value)
    assert str(path) in str(raised.value)


def test_scientific_notation_is_number(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 2e-4 as a string; DVC reads it as a number.
    path = tmp_path / "params.yaml"
    text = (REPO_ROOT / "params.yaml").read_text()
    path.write_text(text.replace("  lr: 0.0002\n", "  lr: 2e-4\n", 1))
    assert load_params(path)["train_gan"]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "Yes"])
def test_yaml_11_boolean_word_rejected(tmp_path, word):
    # DVC reads YAML 1.2, where these words are strings, so accepting them as booleans would disagree with DVC.
    path = tmp_path / "params.yaml"
    text = (REPO_ROOT / "params.yaml").read_text()
    path.write_text(text.replace("  spectral_norm: false\n", f"  spectral_norm: {word}\n", 1))
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert "train_gan.spectral_norm" in str(raised.value)
    assert word in str(raised.value)
    assert "true or false" in str(raised.value)


def test_yaml_12_boolean_accepted(tmp_path):
    path = tmp_path / "params.yaml"
    text = (REPO_ROOT / "params.yaml").read_text()
    path.write_text(text.replace("  spectral_norm: false\n", "  spectral_norm: True\n", 1))
    assert load_params(path)["train_gan"]["spectral_norm"] is True


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("threshold: [0.5\n")
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert f"{path}: invalid YAML" in str(raised.value)


def test_integral_float_accepted_for_integer():
    params = validate(with_value(default_params(), "generate.num_samples", 1e3))
    assert params["generate"]["num_samples"] == 1000
    assert isinstance(params["generate"]["num_samples"], int)


@pytest.mark.integration
def test_bad_evaluate_value_fails_first_stage(tiny_repo):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 0
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    started = time.monotonic()
    result = run(["dvc", "repro"], tiny_repo, check=False)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert "Running stage 'prepare'" in result.stdout
    assert "Running stage 'train_evaluator'" not in result.stdout
    assert "error in stage prepare: params.yaml has 1 invalid parameter(s)" in result.stderr
    assert "evaluate.batch_size: invalid value 0; expected an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 60, f"the failing dvc repro took {elapsed:.0f} s"
    assert not (tiny_repo / "data" / "prepared").exists()
    assert not (tiny_repo / "dvc.lock").exists()
