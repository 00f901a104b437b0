"""Schema and validation of params.yaml.

Every stage validates the whole file before it does any work, so a bad value
fails within seconds even when the stage that reads it runs last. Unknown keys
are errors with the closest valid key suggested, never silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from rsft.errors import ParamsError

CALIBRATION_METHODS = ("none", "platt", "isotonic")
REJECTION_RULES = ("threshold", "quantile", "drs")
FINETUNE_METHODS = ("adversarial", "mixed")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Spec:
    """Type and allowed range of one parameter."""

    kind: type
    allowed: str
    check: Callable[[Any], bool] = lambda value: True
    choices: tuple[str, ...] | None = None


def _integer(minimum: int) -> Spec:
    return Spec(int, f"an integer >= {minimum}", lambda v: v >= minimum)


def _real(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Spec:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"

    def check(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below

    return Spec(float, f"a number in {left}{low}, {high}{right}", check)


def _choice(choices: tuple[str, ...]) -> Spec:
    return Spec(str, "one of " + ", ".join(choices), lambda v: v in choices, choices)


_POSITIVE_REAL = _real(0.0, math.inf, low_open=True, high_open=True)
_NONEMPTY_TEXT = Spec(str, "a non-empty string", lambda v: bool(v.strip()))

SCHEMA: dict[str, Spec] = {
    "seed": _integer(0),
    "threshold": _real(0.0, 1.0),
    "device": _choice(DEVICES),
    "data.dir": _NONEMPTY_TEXT,
    "data.limit": _integer(0),
    "data.validation_size": _integer(1),
    "train_evaluator.epochs": _integer(1),
    "train_evaluator.batch_size": _integer(1),
    "train_evaluator.lr": _POSITIVE_REAL,
    "train_gan.epochs": _integer(1),
    "train_gan.batch_size": _integer(2),
    "train_gan.latent_dim": _integer(1),
    "train_gan.base_channels": _integer(1),
    "train_gan.lr": _POSITIVE_REAL,
    "train_gan.beta1": _real(0.0, 1.0, high_open=True),
    "train_gan.spectral_norm": Spec(bool, "true or false"),
    "train_gan.log_every": _integer(1),
    "generate.num_samples": _integer(1),
    "generate.batch_size": _integer(1),
    "score.calibration": _choice(CALIBRATION_METHODS),
    "score.num_calibration": _integer(10),
    "reject.rule": _choice(REJECTION_RULES),
    "reject.keep_fraction": _real(0.0, 1.0, low_open=True),
    "reject.drs_gamma_percentile": _real(0.0, 100.0),
    "reject.drs_epsilon": _real(0.0, 1.0, low_open=True, high_open=True),
    "finetune.method": _choice(FINETUNE_METHODS),
    "finetune.real_fraction": _real(0.0, 1.0),
    "finetune.steps": _integer(1),
    "finetune.batch_size": _integer(2),
    "finetune.lr": _POSITIVE_REAL,
    "finetune.seed": _integer(0),
    "evaluate.num_samples": _integer(2),
    "evaluate.seed": _integer(0),
    "evaluate.batch_size": _integer(1),
    "evaluate.max_draws_per_sample": _integer(1),
    "tracking.experiment": _NONEMPTY_TEXT,
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _coerce(key: str, value: Any, spec: Spec) -> tuple[Any, str | None]:
    """Return the value converted to the spec's type, or an error message."""
    shown = repr(value)
    if spec.kind is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
    if isinstance(value, bool):
        return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
    if spec.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
    elif spec.kind is float:
        if not isinstance(value, (int, float)):
            return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
        value = float(value)
    elif spec.kind is str and not isinstance(value, str):
        return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
    if not spec.check(value):
        return None, f"{key}: invalid value {shown}; expected {spec.allowed}"
    return value, None


def validate(raw: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Check every key of a parsed params file against SCHEMA.

    Args:
        raw: The parsed YAML document.
        source: File name used in error messages.

    Returns:
        A nested dict with the same keys, ints and floats normalized to the
        schema's types (threshold 1 becomes 1.0).

    Raises:
        ParamsError: Listing every unknown, missing or invalid key at once.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of parameters, got {type(raw).__name__}")

    flat = flatten(raw)
    problems: list[str] = []
    normalized: dict[str, Any] = {}

    for key, value in flat.items():
        spec = SCHEMA.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, SCHEMA, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(SCHEMA)}"
            problems.append(f"{key}: unknown key{hint}")
            continue
        value, problem = _coerce(key, value, spec)
        if problem:
            problems.append(problem)
        else:
            normalized[key] = value

    for key in SCHEMA:
        if key not in flat:
            problems.append(f"{key}: missing; expected {SCHEMA[key].allowed}")

    if problems:
        lines = "\n  ".join(problems)
        raise ParamsError(f"{source} has {len(problems)} invalid parameter(s):\n  {lines}")
    return _unflatten(normalized)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file; see validate()."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run the stage from the repository root") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: invalid YAML: {error}") from None
    return validate(raw, source=str(path))


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of params with dotted-key overrides applied."""
    flat = flatten(copy.deepcopy(params))
    flat.update(overrides)
    return validate(_unflatten(flat), source="overrides")
