"""One typed, validated configuration for a whole experiment.

The defaults live in exactly one place, `[tool.flwr.app.config]` of pyproject.toml:
Flower merges them into every run's `context.run_config`, and `default_run_config()`
reads the same table for the CLI and the tests. `ExperimentConfig.from_run_config`
turns those kebab-case keys into typed fields and rejects bad values before any
training starts, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A run-config value that cannot work; raised before any training."""


@dataclass(frozen=True)
class ExperimentConfig:
    """All settings of one run. Field `x_y` is run-config key `x-y`."""

    dataset: str
    num_clients: int
    min_clients: int
    round_timeout: float
    num_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    partition: str
    dirichlet_alpha: float
    mcr: float
    pdr: float
    source_label: int
    target_label: int
    trigger: str
    trigger_pixels: int
    trigger_value: float
    trigger_corner: str
    trigger_margin: int
    aggregation: str
    rlr_theta: int
    rlr_eta: float
    krum_f: int
    multikrum_m: int
    trim_beta: float
    invariant_threshold: float
    invariant_beta: float
    post_defenses: str
    flain_step: float
    flain_rho: float
    flain_layer: str
    aux_size: int
    fedpruning_rate: float
    fedpruning_extreme: float
    fedpruning_finetune_rounds: int
    train_fraction: float
    precision: str
    seed: int
    data_dir: str
    run_dir: str

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build and validate from Flower's run config (kebab-case keys)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {name.replace("_", "-") for name in fields}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; allowed keys: {sorted(known)}"
            )
        missing = sorted(known - set(run_config))
        if missing:
            raise ConfigError(f"missing run-config key(s) {missing}")
        values = {}
        for name, field in fields.items():
            key = name.replace("_", "-")
            values[name] = _coerce(key, run_config[key], field.type)
        from experiment.data import DATASETS

        if values["aux_size"] == 0 and values["dataset"] in DATASETS:  # 0: the paper's size
            values["aux_size"] = DATASETS[values["dataset"]].aux_size
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def defaults(cls, **overrides: Any) -> ExperimentConfig:
        """The pyproject defaults, with snake_case overrides (handy in code and tests)."""
        run_config = default_run_config()
        for name, value in overrides.items():
            run_config[name.replace("_", "-")] = value
        return cls.from_run_config(run_config)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case mapping, as written to config.json and passed to Flower."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A validated copy with some fields changed."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ---- derived values -----------------------------------------------------------
    @property
    def post_defense_names(self) -> list[str]:
        return [n.strip() for n in self.post_defenses.split(",") if n.strip()]

    @property
    def min_replies(self) -> int:
        """Clients a round needs to go on: `min-clients`, or (0) half of num-clients, rounded up."""
        return self.min_clients or -(-self.num_clients // 2)

    @property
    def num_malicious(self) -> int:
        return int(round(self.mcr * self.num_clients))

    def run_path(self, name: str | None = None) -> Path:
        """`run-dir` as given, or runs/<name> (default: data set, split, attack, rule, seed, time)."""
        if self.run_dir:
            return Path(self.run_dir)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / (
            name or f"{self.dataset}-{self.partition}-{self.trigger}-{self.aggregation}-s{self.seed}-{stamp}"
        )

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first bad key, its value and what is allowed."""
        # Imported here: the registries import modules that import this one.
        from attacks import CORNERS, PIXEL_COUNTS, TRIGGERS
        from experiment.data import DATASETS
        from models import PRECISIONS
        from strategies import AGGREGATIONS, POST_DEFENSES

        _choice("dataset", self.dataset, DATASETS)
        _choice("partition", self.partition, ("iid", "dirichlet"))
        _choice("trigger", self.trigger, TRIGGERS)
        _choice("trigger-corner", self.trigger_corner, CORNERS)
        if self.trigger_pixels not in (0, *PIXEL_COUNTS):
            raise ConfigError(f"trigger-pixels={self.trigger_pixels} is not allowed: 0 (the default pattern) or one of {list(PIXEL_COUNTS)}")
        if self.trigger_pixels and self.trigger != "cba":
            raise ConfigError(f"trigger-pixels={self.trigger_pixels} applies to trigger='cba' only, not {self.trigger!r}")
        _unit_interval("trigger-value", self.trigger_value, low_open=True)
        _at_least("trigger-margin", self.trigger_margin, 0)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("precision", self.precision, PRECISIONS)
        for name in self.post_defense_names:
            _choice("post-defenses", name, POST_DEFENSES)
        if len(set(self.post_defense_names)) != len(self.post_defense_names):
            raise ConfigError(f"post-defenses={self.post_defenses!r} names a defense twice")

        _at_least("num-clients", self.num_clients, 1)
        _at_least("num-rounds", self.num_rounds, 1)
        if not 0 <= self.min_clients <= self.num_clients:
            raise ConfigError(f"min-clients={self.min_clients} is not allowed: 0 (auto: half) or 1..{self.num_clients}")
        _positive("round-timeout", self.round_timeout)
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _positive("lr", self.lr)
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        _unit_interval("mcr", self.mcr, low_open=False)
        _unit_interval("pdr", self.pdr, low_open=False)
        _unit_interval("train-fraction", self.train_fraction, low_open=True)
        _positive("flain-step", self.flain_step)
        _unit_interval("flain-rho", self.flain_rho, low_open=True)
        _at_least("aux-size", self.aux_size, 1)
        _positive("rlr-eta", self.rlr_eta)
        _at_least("rlr-theta", self.rlr_theta, 0)
        _at_least("krum-f", self.krum_f, -1)
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta={self.trim_beta} is not allowed: must satisfy 0 <= value < 0.5")
        if not 0 <= self.invariant_beta < 0.5:
            raise ConfigError(f"invariant-beta={self.invariant_beta} is not allowed: must satisfy 0 <= value < 0.5")
        _unit_interval("invariant-threshold", self.invariant_threshold, low_open=False)
        if not 0 <= self.fedpruning_rate < 1:
            raise ConfigError(f"fedpruning-rate={self.fedpruning_rate} is not allowed: 0 (adaptive) or 0 < value < 1")
        if self.fedpruning_extreme < 0:
            raise ConfigError(f"fedpruning-extreme={self.fedpruning_extreme} is not allowed: must be >= 0 (0 = off)")
        _at_least("fedpruning-finetune-rounds", self.fedpruning_finetune_rounds, 0)
        from strategies.aggregation import check

        if (problem := check(self)) is not None:
            raise ConfigError(problem)

        spec = DATASETS[self.dataset]
        for key, label in (("source-label", self.source_label), ("target-label", self.target_label)):
            if not 0 <= label < spec.num_classes:
                raise ConfigError(
                    f"{key}={label} is not a class of {self.dataset}: "
                    f"allowed 0..{spec.num_classes - 1}"
                )
        if self.source_label == self.target_label:
            raise ConfigError(
                f"source-label={self.source_label} equals target-label={self.target_label}; "
                "the backdoor must change the label"
            )
        from attacks import trigger_scheme

        try:
            trigger_scheme(self, *spec.shape[1:])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.aux_size >= spec.test_size:
            raise ConfigError(
                f"aux-size={self.aux_size} leaves no test images: must be < {spec.test_size}"
            )
        from models import build_model, resolve_tau

        try:
            resolve_tau(build_model(self.dataset), self.flain_layer)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.data_dir:
            raise ConfigError("data-dir='' is empty: give a directory for the data sets")


def default_run_config(pyproject: Path | None = None) -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table of pyproject.toml (the only defaults)."""
    path = pyproject or PROJECT_ROOT / "pyproject.toml"
    with path.open("rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings with TOML value rules, as `flwr run --run-config` does."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not of the form key=value")
        key = key.strip()
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()  # bare words are strings: trigger=cba
    return out


# ---- small checks -----------------------------------------------------------------
def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def _choice(key: str, value: str, allowed: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {sorted(allowed)}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} is not allowed: must be an integer >= {low}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} is not allowed: must be > 0")


def _unit_interval(key: str, value: float, low_open: bool) -> None:
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        bound = "0 < value <= 1" if low_open else "0 <= value <= 1"
        raise ConfigError(f"{key}={value} is not allowed: must satisfy {bound}")
