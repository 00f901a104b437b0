"""Schema and validation of params.yaml.

Every stage validates the whole file before it does any work, so a bad value
fails within seconds even when the stage that reads it runs last. Unknown keys
are errors with the closest valid key suggested, never silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from rsft.errors import ParamsError

MAX_SEED = 2**32 - 1
CALIBRATION_METHODS = ("none", "platt", "isotonic")
REJECTION_RULES = ("threshold", "quantile", "drs")
FINETUNE_METHODS = ("adversarial", "mixed", "topk", "weighted")
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


def _seed() -> Spec:
    # torch.manual_seed accepts up to 2**64 - 1 and NumPy's legacy seeding up
    # to 2**32 - 1; the smaller bound works everywhere.
    return Spec(int, f"an integer in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED)


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
    "seed": _seed(),
    "threshold": _real(0.0, 1.0),
    "device": _choice(DEVICES),
    "data.dir": _NONEMPTY_TEXT,
    # A single training image cannot form a batch: batch normalization needs two.
    "data.limit": Spec(int, "0 (all images) or an integer >= 2", lambda v: v == 0 or v >= 2),
    "data.verify_checksum": Spec(bool, "true or false"),
    "data.validation_size": _integer(1),
    "train_evaluator.epochs": _integer(1),
    "train_evaluator.batch_size": _integer(2),
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
    "finetune.seed": _seed(),
    "finetune.rounds": _integer(1),
    "finetune.threshold_step": _real(0.0, 1.0),
    # Precision, recall, density and coverage use 5 nearest neighbours, so they need 6 samples.
    "evaluate.num_samples": _integer(6),
    "evaluate.seed": _seed(),
    "evaluate.batch_size": _integer(1),
    "evaluate.max_draws_per_sample": _integer(1),
    "evaluate.max_recall_drop": _real(0.0, 1.0),
    "evaluate.inception_weights": Spec(str, 'a path to local Inception v3 weights, or "" to skip'),
    "tracking.experiment": _NONEMPTY_TEXT,
}


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with three differences that catch hand-editing mistakes.

    Floats follow YAML 1.2, the version DVC's parser implements, so `lr: 1e-4`
    is the number 0.0001 here as it is for DVC (YAML 1.1 reads it as a string).
    Booleans follow YAML 1.2 too: only true and false, so `yes`, `no`, `on`
    and `off` stay strings, as DVC reads them, and fail validation. A key repeated in one mapping is an error instead of silently keeping the
    last value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(
                    f"{self.name}: key '{key}' appears twice in the same mapping (lines {seen[key]} and {line}); "
                    f"keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# add_implicit_resolver gave the loader its own copy of the resolvers; drop YAML 1.1's booleans from it.
_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers
            if tag != "tag:yaml.org,2002:bool" or pattern.pattern.startswith("^(?:true|True")]
    for first, resolvers in _ParamsLoader.yaml_implicit_resolvers.items()
}
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


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
        loader = _ParamsLoader(text)
        loader.name = str(path)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: invalid YAML: {error}") from None
    return validate(raw, source=str(path))


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of params with dotted-key overrides applied."""
    flat = flatten(copy.deepcopy(params))
    flat.update(overrides)
    return validate(_unflatten(flat), source="overrides")
