"""Result tables of finished runs: the one `flain run` prints, and `flain table`'s
markdown comparison (the paper's rows: FedAvg = no-Defense, FedAvg + FLAIN = FLAIN, ...)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from server.results import RunDir, RunFileError
from strategies import POST_DEFENSES


class NotARunDirectory(ValueError):
    """A path given as a run directory is not one (message: one line, says why)."""


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, summary.json) of a run directory that has finished training."""
    if not run_dir.is_dir():
        raise NotARunDirectory(f"{run_dir} is not a directory")
    try:
        config = RunDir(run_dir).config(("dataset", "aggregation"))
        summary = RunDir(run_dir).summary(("status",))
    except RunFileError as exc:
        raise NotARunDirectory(f"not a run directory: {exc}") from None
    odd = [k for k in ("dataset", "aggregation") if not _name(config[k])]
    if odd:
        raise NotARunDirectory(f"{RunDir(run_dir).config_file}: {', '.join(odd)} not a name of ours")
    if "final" not in summary:
        raise NotARunDirectory(f"{run_dir} holds no finished training (status {summary['status']!r})")
    if not _result(summary["final"]):
        raise NotARunDirectory(f"{RunDir(run_dir).summary_file}: final ACC/ASR are not numbers in [0, 1]")
    check_post_defenses(summary, RunDir(run_dir).summary_file)
    return config, summary


def check_post_defenses(summary: dict[str, Any], where: Path) -> None:
    """A summary's post_defenses, as ours are: {name: {acc, asr in [0, 1], ...} or {error, ...}}."""
    results = summary.get("post_defenses", {})
    if not isinstance(results, dict):
        raise NotARunDirectory(f"{where}: post_defenses is a {type(results).__name__}, not a table of results")
    bad = [name for name, res in results.items()
           if not _name(name) or not isinstance(res, dict) or (("acc" in res or "asr" in res) and not _result(res))]
    if bad:
        raise NotARunDirectory(f"{where}: post_defenses {', '.join(map(repr, bad))} are not results of ours")


def _name(value: Any) -> bool:
    """A registry name (a data set, a rule, a defense): what our files hold, nothing a table could not show."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value) is not None


def _result(value: Any) -> bool:
    """{acc, asr} with numbers in [0, 1]: what our summaries hold."""
    return isinstance(value, dict) and all(
        isinstance(value.get(k), int | float) and not isinstance(value.get(k), bool) and 0 <= value[k] <= 1
        for k in ("acc", "asr"))


def format_table(summary: dict[str, Any]) -> str:
    """The results table `flain run` prints."""
    nan = float("nan")  # a metric nobody measured (`flain defend --model` without --test or --triggered)
    rows = [("no-Defense", summary["final"].get("acc", nan), summary["final"].get("asr", nan), "")]
    for name, res in summary.get("post_defenses", {}).items():
        if "error" in res:
            rows.append((name, nan, nan, f"FAILED: {res['error']}"))
            continue
        defense = POST_DEFENSES.get(name)
        try:
            note = defense.note(res) if defense else ""
        except (KeyError, TypeError, ValueError):  # a result written by another version
            note = ""
        rows.append((name, res.get("acc", nan), res.get("asr", nan), note))
    lines = [f"{'defense':<12} {'ACC':>7} {'ASR':>7}  notes", "-" * 60]
    number = lambda v: f"{v:7.4f}" if v is not None and v == v else f"{'-':>7}"  # noqa: E731 - not measured
    lines += [f"{n:<12} {number(a)} {number(s)}  {note}" for n, a, s, note in rows]
    return "\n".join(lines)


_RULE_NAMES = {"fedavg": "no-Defense", "rlr": "RLR"}  # the paper's row names


def comparison_rows(run_dirs: list[Path]) -> list[tuple[str, str, float, float]]:
    """(run, defense, ACC, ASR) for every run directory: the trained model under its
    aggregation rule, then each post-training defense applied to it (the paper's rows:
    FedAvg = no-Defense, FedAvg + FLAIN = FLAIN, RLR = RLR, ...)."""
    rows = []
    for run_dir in run_dirs:
        config, summary = read_run(run_dir)
        rule = config["aggregation"]
        base = _RULE_NAMES.get(rule, rule)
        rows.append((run_dir.name, base, summary["final"]["acc"], summary["final"]["asr"]))
        defended = [("", summary)]
        for d in RunDir(run_dir).defended_results():
            try:
                results = d.summary(("post_defenses",))
            except RunFileError as exc:
                raise NotARunDirectory(str(exc)) from None
            check_post_defenses(results, d.summary_file)
            defended.append((f" [defend {d.name}]", results))
        for mark, results in defended:  # the run's own defenses, then `flain defend`'s
            for name, res in results.get("post_defenses", {}).items():
                if "acc" in res:
                    label = POST_DEFENSES[name].display_name if name in POST_DEFENSES else name
                    label = label if rule == "fedavg" else f"{base} + {label}"
                    rows.append((run_dir.name, label + mark, res["acc"], res["asr"]))
    return rows


def markdown_table(rows: list[tuple[str, str, float, float]]) -> str:
    cell = lambda text: " ".join(text.split()).replace("|", "\\|")  # noqa: E731 - a directory name is anyone's
    lines = ["| run | defense | ASR | ACC |", "| --- | --- | --- | --- |"]
    lines += [f"| {cell(run)} | {cell(label)} | {asr:.3f} | {acc:.3f} |" for run, label, acc, asr in rows]
    return "\n".join(lines)
