"""One typed configuration for a whole experiment, and the checks it can make alone.

The defaults are the field defaults below. Flower needs them once more, as
`[tool.flwr.app.config]` in pyproject.toml (it merges that table into every run's
`context.run_config`); a test keeps the two equal. Nothing here reads a file, so the
configuration works the same from a source tree and from an installed wheel.

This module imports nothing from the project. Checks that need a registry (is the data
set known, does the trigger fit its images, is tau a Linear layer, can the aggregation
rule work with these counts) live beside that registry; `server.checks` runs them all,
from one place, before anything starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run-config value that cannot work; raised before any training."""


INT_LIMIT = 2**63 - 1
SEED_LIMIT = 2**32 - 1  # seeds are mixed into numpy/torch streams; Flower needs 64-bit at most
FLAIN_STEP_RANGE = (1e-6, 1.0)  # activations of a ReLU layer; below 1e-6 the search takes minutes


@dataclass(frozen=True)
class ExperimentConfig:
    """All settings of one run. Field `x_y` is run-config key `x-y`."""

    dataset: str = "fmnist"
    network: str = "paper"  # paper: the authors' networks; two-dropout: dropout only around fc1
    num_clients: int = 10
    clients_per_round: int = 0  # 0: every client trains every round (the paper); k: k sampled per round
    attacker_schedule: str = "random"  # random: attackers sampled like everyone; fixed: attackers-per-round each round
    attackers_per_round: int = -1  # fixed schedule: attackers in every round's sample; -1: mcr x clients-per-round
    min_clients: int = 0  # 0: half of the round's clients, rounded up
    round_timeout: float = 600.0
    max_examples: int = 0  # 0: a client's partition size, as the server computes it
    num_rounds: int = 0  # 0: the data set's training length (experiment/data.py)
    checkpoint_every: int = 0  # K: save the global model (and what the strategy keeps) every K rounds
    resume: int = 0  # 1: go on with the run in run-dir after its last checkpoint (`flain run --resume`)
    tracker: str = "none"  # none, or tensorboard: event files in the run directory (server/tracking.py)
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 0.001
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    mcr: float = 0.4
    pdr: float = 0.3
    source_label: int = 0
    target_label: int = 5
    trigger: str = "cba"
    trigger_pixels: int = 0
    trigger_value: float = 1.0
    trigger_corner: str = "bottom-right"
    trigger_margin: int = 0
    attack: str = "none"  # none: plain data poisoning; see attacks/__init__.py for the others
    neurotoxin_topk: float = 0.05
    scaling_factor: float = 0.0  # 0: num-clients / num-malicious (the attackers replace the model)
    pgd_eps: float = 5.0
    flain_aware_quantile: float = 0.5
    flain_aware_lambda: float = 1.0
    aggregation: str = "fedavg"
    rlr_theta: int = 0  # 0: a strict majority of each round's replies
    rlr_eta: float = 1.0
    krum_f: int = -1  # -1: the true number of attackers
    multikrum_m: int = 0
    trim_beta: float = 0.2
    invariant_threshold: float = 0.6
    invariant_beta: float = 0.1
    flame_lambda: float = 0.001  # flame: noise std = lambda x the round's clip bound (the paper: 0.001 for images)
    clip_norm: float = 3.0  # norm-clipping, weak-dp: C, the L2 bound of every update (Sun et al. 2019)
    dp_sigma: float = 0.025  # weak-dp: std of the Gaussian noise on every parameter of the aggregate
    fltrust_root_size: int = 100  # fltrust: the server's clean root set, drawn from the test split outside the aux set
    post_defenses: str = "flain,flain-cv"
    flain_step: float = 0.001
    flain_start: float = -1.0  # the first threshold; -1: min(activation) + flain-step (the paper)
    flain_rho: float = 0.02
    flain_layer: str = "auto"
    aux_size: int = 0  # 0: the paper's size for the data set
    aux_draw: str = "random"  # random: a seeded draw; per-class: the first aux-size/classes of each class
    flain_cv_tol: float = 0.02
    flain_cv_folds: int = 5
    flain_cv_scores: str = "crossfit"
    flain_cv_select: str = "last-within"
    flain_cv_accuracy: str = "soft"
    flain_subspace_tol: float = 0.02
    flain_subspace_folds: int = 5
    flain_subspace_augment: str = "shift-mirror"
    fedpruning_rate: float = 0.0
    fedpruning_extreme: float = 3.0
    fedpruning_finetune_rounds: int = 0
    train_fraction: float = 1.0
    precision: str = "auto"
    seed: int = 42
    data_dir: str = "data"
    run_dir: str = ""

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build from Flower's run config (kebab-case keys; missing keys take their
        defaults) and make the checks this module can make alone."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {name.replace("_", "-") for name in fields}
        unknown = sorted(set(run_config) - known)
        if unknown:
            hint = _closest(unknown[0], known)
            raise ConfigError(
                f"unknown run-config key {unknown[0]!r}{hint}; allowed keys: {', '.join(sorted(known))}"
            )
        values = {}
        for name, field in fields.items():
            key = name.replace("_", "-")
            if key in run_config:
                values[name] = _coerce(key, run_config[key], field.type)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def defaults(cls, **overrides: Any) -> ExperimentConfig:
        """The defaults with snake_case overrides (handy in code and tests)."""
        return cls.from_run_config({k.replace("_", "-"): v for k, v in overrides.items()})

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
    def round_clients(self) -> int:
        """Clients that train in each round: `clients-per-round`, or (0) all of them."""
        return self.clients_per_round or self.num_clients

    @property
    def sampled(self) -> bool:
        """Whether the server chooses each round's clients (else every connected client trains)."""
        return self.round_clients < self.num_clients or self.attacker_schedule == "fixed"

    @property
    def round_attackers(self) -> int:
        """Attackers in a round: exactly that many under the fixed schedule; the expected
        count, rounded half up, under the random one (num-malicious when all clients train)."""
        if self.attacker_schedule == "fixed" and self.attackers_per_round >= 0:
            return self.attackers_per_round
        return _round_half_up(Fraction(self.num_malicious, self.num_clients) * self.round_clients)

    @property
    def min_replies(self) -> int:
        """Clients a round needs to go on: `min-clients`, or (0) half of the round's clients, rounded up."""
        return self.min_clients or -(-self.round_clients // 2)

    @property
    def num_malicious(self) -> int:
        """round(mcr * num-clients), halves rounded up, computed exactly on the decimal
        mcr: 0.4/0.5/0.6 of 10 give 4/5/6, of 20 give 8/10/12; 0.25 of 10 gives 3."""
        return _round_half_up(Fraction(str(self.mcr)) * self.num_clients)

    def run_path(self, name: str | None = None) -> Path:
        """`run-dir` as given, or runs/<name> (default: data set, split, attack, rule, seed, time)."""
        if self.run_dir:
            return Path(self.run_dir)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / (
            name or f"{self.dataset}-{self.partition}-{self.trigger}-{self.aggregation}-s{self.seed}-{stamp}"
        )

    # ---- the checks that need no registry ---------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first bad key, its value and what is allowed."""
        for f in dataclasses.fields(self):  # NaN passes every `<` check below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name.replace('_', '-')}={value} is not allowed: must be a finite number")
        at_least("num-clients", self.num_clients, 1)
        at_least("num-rounds", self.num_rounds, 0)
        at_least("checkpoint-every", self.checkpoint_every, 0)
        if self.resume not in (0, 1):
            raise ConfigError(f"resume={self.resume} is not allowed: 0, or 1 (set by flain run --resume)")
        if self.resume and not self.run_dir:
            raise ConfigError("resume=1 needs run-dir: the run to go on with")
        if not 0 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(f"clients-per-round={self.clients_per_round} is not allowed: "
                              f"0 (all) or 1..{self.num_clients} (num-clients)")
        if not 0 <= self.min_clients <= self.round_clients:
            raise ConfigError(f"min-clients={self.min_clients} is not allowed: 0 (auto: half) "
                              f"or 1..{self.round_clients} (the clients of a round)")
        choice("attacker-schedule", self.attacker_schedule, ("random", "fixed"))
        at_least("attackers-per-round", self.attackers_per_round, -1)
        if self.attacker_schedule == "random" and self.attackers_per_round != -1:
            raise ConfigError(f"attackers-per-round={self.attackers_per_round} needs attacker-schedule='fixed' "
                              "(random: attackers are sampled like everyone)")
        if self.attacker_schedule == "fixed":
            a, k, m = self.round_attackers, self.round_clients, self.num_malicious
            if a > k or a > m or k - a > self.num_clients - m:
                raise ConfigError(
                    f"attacker-schedule='fixed' with {a} attackers in each round of {k} clients is not possible: "
                    f"there are {m} malicious and {self.num_clients - m} benign clients (mcr={self.mcr})")
        positive("round-timeout", self.round_timeout)
        at_least("max-examples", self.max_examples, 0)
        at_least("local-epochs", self.local_epochs, 1)
        at_least("batch-size", self.batch_size, 1)
        positive("lr", self.lr)
        positive("dirichlet-alpha", self.dirichlet_alpha)
        unit_interval("mcr", self.mcr, low_open=False)
        unit_interval("pdr", self.pdr, low_open=False)
        unit_interval("train-fraction", self.train_fraction, low_open=True)
        unit_interval("trigger-value", self.trigger_value, low_open=True)
        at_least("trigger-margin", self.trigger_margin, 0)
        if self.source_label == self.target_label:
            raise ConfigError(
                f"source-label={self.source_label} equals target-label={self.target_label}; "
                "the backdoor must change the label"
            )
        low, high = FLAIN_STEP_RANGE
        if not low <= self.flain_step <= high:
            raise ConfigError(f"flain-step={self.flain_step} is not allowed: must satisfy {low:g} <= value <= {high:g}")
        if self.flain_start != -1.0 and not self.flain_start >= 0:
            raise ConfigError(f"flain-start={self.flain_start} is not allowed: -1 (the paper: min + flain-step) or >= 0")
        unit_interval("flain-rho", self.flain_rho, low_open=True)
        unit_interval("flain-cv-tol", self.flain_cv_tol, low_open=True)
        at_least("flain-cv-folds", self.flain_cv_folds, 2)
        unit_interval("flain-subspace-tol", self.flain_subspace_tol, low_open=True)
        at_least("flain-subspace-folds", self.flain_subspace_folds, 2)
        if self.aux_size < 0:
            raise ConfigError(f"aux-size={self.aux_size} is not allowed: 0 (the paper's size) or a positive count")
        if not 0 < self.neurotoxin_topk < 1:
            raise ConfigError(f"neurotoxin-topk={self.neurotoxin_topk} is not allowed: must satisfy 0 < value < 1")
        if not self.scaling_factor >= 0:
            raise ConfigError(f"scaling-factor={self.scaling_factor} is not allowed: 0 (auto) or a factor > 0")
        positive("pgd-eps", self.pgd_eps)
        if not 0 < self.flain_aware_quantile < 1:
            raise ConfigError(f"flain-aware-quantile={self.flain_aware_quantile} is not allowed: "
                              "must satisfy 0 < value < 1")
        if not self.flain_aware_lambda >= 0:
            raise ConfigError(f"flain-aware-lambda={self.flain_aware_lambda} is not allowed: must be >= 0 (0 = off)")
        positive("rlr-eta", self.rlr_eta)
        at_least("rlr-theta", self.rlr_theta, 0)
        at_least("krum-f", self.krum_f, -1)
        at_least("multikrum-m", self.multikrum_m, 0)
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta={self.trim_beta} is not allowed: must satisfy 0 <= value < 0.5")
        if not 0 <= self.invariant_beta < 0.5:
            raise ConfigError(f"invariant-beta={self.invariant_beta} is not allowed: must satisfy 0 <= value < 0.5")
        unit_interval("invariant-threshold", self.invariant_threshold, low_open=False)
        if not self.flame_lambda >= 0:
            raise ConfigError(f"flame-lambda={self.flame_lambda} is not allowed: must be >= 0 (0 = no noise)")
        positive("clip-norm", self.clip_norm)
        positive("dp-sigma", self.dp_sigma)
        at_least("fltrust-root-size", self.fltrust_root_size, 1)
        if not 0 <= self.fedpruning_rate < 1:
            raise ConfigError(f"fedpruning-rate={self.fedpruning_rate} is not allowed: 0 (adaptive) or 0 < value < 1")
        if not self.fedpruning_extreme >= 0:
            raise ConfigError(f"fedpruning-extreme={self.fedpruning_extreme} is not allowed: must be >= 0 (0 = off)")
        at_least("fedpruning-finetune-rounds", self.fedpruning_finetune_rounds, 0)
        names = self.post_defense_names
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"post-defenses={self.post_defenses!r} names {twice} twice: give each defense once")
        if not 0 <= self.seed <= SEED_LIMIT:
            raise ConfigError(f"seed={self.seed} is not allowed: must satisfy 0 <= value <= {SEED_LIMIT}")
        if not self.data_dir:
            raise ConfigError("data-dir='' is empty: give a directory for the data sets")


def _round_half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2))


def default_run_config() -> dict[str, Any]:
    """Every key with its default (kebab-case), as Flower's run config holds them."""
    return ExperimentConfig().to_run_config()


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings with TOML value rules, as `flwr run --run-config` does."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not of the form key=value")
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words are strings: trigger=cba
        if key in out:
            raise ConfigError(f"{key} is given twice ({out[key]!r} and {value!r}): give each key once")
        out[key] = value
    return out


# ---- small checks, shared with the registries' own checks ------------------------------
def choice(key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = sorted(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {allowed}")


def at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} is not allowed: must be an integer >= {low}")


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} is not allowed: must be > 0")


def unit_interval(key: str, value: float, low_open: bool) -> None:
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        bound = "0 < value <= 1" if low_open else "0 <= value <= 1"
        raise ConfigError(f"{key}={value} is not allowed: must satisfy {bound}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is not allowed: must be an integer")
        if not -INT_LIMIT <= value <= INT_LIMIT:  # Flower carries run-config integers as 64-bit
            raise ConfigError(f"{key}={value} is not allowed: out of range")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} is not allowed: must be a number")
        if not math.isfinite(value):  # NaN passes every `<` check, inf most of them
            raise ConfigError(f"{key}={value} is not allowed: must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not allowed: must be a string")
    return value


def _closest(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
