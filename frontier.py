"""Matched verdicts: is a run better, tied or worse than the baseline SAE *at the run's L0*?

Explained variance, the CE-loss score and the KL score all rise with L0, so a run's numbers mean
little next to a baseline trained at another sparsity. The baseline is swept over one knob (an L1
`sparsity_penalty`, or a TopK `k`) on the same activations; its completed runs give, per metric, a
frontier of points (L0, value, uncertainty, knob value). A run is compared with the frontier's
value at the run's own L0.

    records = [record_from_final_info(info, "sparsity_penalty") for info in baseline_infos]
    frontiers = build_frontiers(records)            # {metric: frontier}
    run = pool_seeds([record_from_final_info(i, "sparsity_penalty") for i in run_infos])
    info["verdict"] = verdict(run, frontiers)       # {metric: entry}, JSON-serialisable as is

A record is one run: {"l0": float, "metrics": {name: float | None}, "knob": (name, value),
"seed": int, "uncertainties": {name: float}, "convergence": dict, "folder": path}; "uncertainties"
(e.g. `bootstrap_se` over its evaluation batches), "seed", "convergence" (runs.convergence) and
"folder" (where its per-context rows are) are optional. Records of one knob value but several seeds are pooled
(`pool_seeds`): the point is their mean and its uncertainty the standard error across seeds; a
single seed keeps its own uncertainty, or None.

A frontier is {"knob": name, "points": [{"l0", "value", "uncertainty", "knob_value", "seeds"}]}
sorted by L0, plus "excluded": why a record was left out (L0 not positive, value missing).

The rules:
- `interpolate`: linear in log L0 between the two points that bracket the L0 (its uncertainty is
  the same interpolation of theirs); never extrapolated: outside the sweep's L0 range it gives
  value None and the reason. A frontier bends (concave in log L0, MCC peaked), so the chord is off
  by its curvature: where a third point neighbours the pair, the chord's distance from the parabola
  through the three is Δ's "interpolation" part (a systematic error, counted as known).
- Δ = run − baseline, raw, in the metric's own units and sign; the word carries the direction
  (`higher_is_better`, default `HIGHER_IS_BETTER`).
- Δ's uncertainty, where the run and the points it is matched against all kept their per-context
  rows (`rows_of`, `score_of`): a paired bootstrap over the evaluation contexts they share
  (`paired_se`: one resample of contexts scores both sides, the baseline through the same
  interpolation weights), and each side's seed-to-seed spread over its seeds' mean (the run's own,
  the baseline architecture's pooled over its swept points: `seed_spread`; a side without one
  borrows the other's: then the two parts are one estimate, with the lender's degrees of freedom),
  in quadrature; entry["pairing"] says "paired over N evaluation contexts". Otherwise ("unpaired:
  why") the run's and the baseline's standard errors in quadrature, each of several seeds with
  the seeds' degrees of freedom. A
  missing part counts as zero (entry["uncertainty_parts"] shows which are known); with none known
  it is None.
- The word: "better" if Δ is beyond Z_BETTER (2) uncertainties in the good direction, "worse" if
  in the bad one, else "tied". With no uncertainty, "tied" only on exact equality, and the word
  ends in " (no uncertainty)". "not converged" instead where the run or a baseline point it is
  matched against was still moving (runs.convergence); with one seed of the run holding the metric
  the word ends in "(one seed: provisional)". entry["seeds"], entry["convergence"] say what it stands on.
- A "tied" where the chord's error is most of the uncertainty carries entry["suggest"] too: the knob
  value between the two points (`fill_knob`), which `study` adds as it widens.
- Outside the sweep: "outside the baseline sweep: widen it", with entry["suggest"], the knob value
  to add: the sweep's two end points on the run's side, fitted as a line in log(knob) against
  log(L0) and followed to AIM_PAST (1.25×) beyond the run's L0 (a one-point sweep, or a fit with
  the wrong slope, assumes L0 ∝ k for a whole-number knob and L0 ∝ 1/penalty otherwise), moved at
  most MAX_KNOB_STEP× (or the L0 ratio) past the sweep's end, rounded to 2 significant digits.
  "no baseline" / "no value" when the frontier or the run lacks the metric.

Which runs make up the baseline (same model, layer, activations, dictionary size) is the caller's
choice; nothing here checks it. The run's L0 is taken as exact (its noise is not propagated).

Below the rules: `verdicts`, a run judged against every baseline swept on its activations (read
from the run index), and `suspicious`, the sanity guards whose findings become a run's warnings."""

from __future__ import annotations

from common import HarnessError  # first: its import guards

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runs import (BASE_TERMS, CONVERGED_WITHIN, Index, load_context_rows, newest, read_json, read_json_lines,
                  run_convergence)

# The run settings a sweep may vary (besides a plugin's hyperparameters).
SWEEPABLE = ("dict_size", "tokens", "batch_size", "lr", "sparsity_penalty", "warmup_steps", "layer")
# A baseline is judged from its runs trained as the judged run was (the activation cache pins tokens
# and layer): a stray run at another lr on the same cache must not take the baseline's frontier away.
MATCHED_SETTINGS = ("dict_size", "batch_size", "lr", "warmup_steps")
UNTRAINED = ("seed", "device", "preset", "evals", "log_every", "checkpoint_every")  # what a run's training never reads

Z_BETTER = 2.0  # Δ must clear two standard errors to count as a difference
OUTSIDE = "outside the baseline sweep: widen it"
# Aim the suggested knob a quarter beyond the run's L0: aimed exactly at it, run-to-run noise
# leaves the new point short of the run about half the time, and the run stays unbracketed.
AIM_PAST = 1.25
# Below this |d log L0 / d log knob| the sweep's own slope is not trusted for a suggestion.
MIN_SLOPE = 0.1
# One suggestion moves the knob at most this factor (or the L0 ratio, if larger) past the sweep's
# end: where L0 saturates (JumpReLU's floor) the flat end would send λ up by orders of magnitude.
# `study` widens round after round, refitting each time.
MAX_KNOB_STEP = 10.0
HIGHER_IS_BETTER = {"explained_variance": True, "ce_loss_score": True, "kl_div_score": True,
                    "cossim": True, "mse": False, "mcc": True, "f1": True}
# Where final_info.json keeps each metric (explained variance's key is the caller's choice).
FINAL_INFO_METRICS = {"ce_loss_score": ("model_performance_preservation", "ce_loss_score"),
                      "kl_div_score": ("model_behavior_preservation", "kl_div_score")}
# A synthetic run (synthetic.py) is judged on recovering the true features instead.
GROUND_TRUTH_METRICS = {"mcc": ("ground_truth", "mcc"), "f1": ("ground_truth", "f1")}


def _finite(x: Any) -> float | None:
    """A plain float, or None for a missing, non-numeric or non-finite value (JSON has no NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def record_from_final_info(info: dict, knob: str, explained_variance_key: str = "explained_variance_whole_set") -> dict:
    """One completed run's final_info.json as a record, with evaluation's bootstrap standard errors
    as its uncertainties; the knob is read from its config (top level, e.g. sparsity_penalty, else
    its plugin's hyperparameters, e.g. k)."""
    if info.get("status") != "completed":
        raise HarnessError(f"run {info.get('run', {}).get('plugin', '?')} is not completed "
                           f"(status {info.get('status')}); only completed runs have a verdict")
    metrics = info.get("metrics", {})
    config = info.get("provenance", {}).get("config", {})
    if knob in config:
        value = config[knob]
    elif knob in config.get("hyperparams", {}):
        value = config["hyperparams"][knob]
    else:
        raise HarnessError(f"knob '{knob}' is neither in the run's config nor in its hyperparameters")
    judged_on = GROUND_TRUTH_METRICS if "ground_truth" in metrics else FINAL_INFO_METRICS
    values = {name: metrics.get(section, {}).get(key) for name, (section, key) in judged_on.items()}
    values["explained_variance"] = metrics.get("reconstruction_quality", {}).get(explained_variance_key)
    se = metrics.get("bootstrap_se", {})
    uncertainties = {name: u for name in values
                     if (u := _finite(se.get(explained_variance_key if name == "explained_variance" else name)))
                     is not None}
    return {"l0": metrics.get("sparsity", {}).get("l0"), "metrics": values, "knob": (knob, value),
            "seed": info.get("provenance", {}).get("seed"), "uncertainties": uncertainties,
            "convergence": info.get("convergence")}


def pool_seeds(records: Sequence[dict]) -> dict:
    """Several seeds of one configuration as one record: mean L0, mean of each metric, and as its
    uncertainty the standard error across seeds (a lone seed keeps its own, or None); per metric, for
    the verdict, the values ("seed_values") and the seeds, folders and convergence ("with_metric")
    of the seeds that have it: a seed whose metric is missing is not one of its seeds."""
    if not records:
        raise HarnessError("no runs to pool")
    l0s = [_finite(r.get("l0")) for r in records]
    names = sorted({name for r in records for name in r.get("metrics", {})})
    metrics, uncertainties, seed_values, with_metric = {}, {}, {}, {}
    for name in names:
        values = [(v, r) for r in records if (v := _finite(r.get("metrics", {}).get(name))) is not None]
        if not values:
            metrics[name] = None
            continue
        seed_values[name] = [v for v, _ in values]
        with_metric[name] = {what: [r.get(key) for _, r in values]
                             for what, key in (("seeds", "seed"), ("folders", "folder"), ("convergence", "convergence"))}
        metrics[name] = float(np.mean([v for v, _ in values]))
        if len(values) > 1:  # the spread across seeds is the honest uncertainty: it includes training noise
            uncertainties[name] = float(np.std([v for v, _ in values], ddof=1) / math.sqrt(len(values)))
        elif (own := _finite(values[0][1].get("uncertainties", {}).get(name))) is not None:
            uncertainties[name] = own
    return {"l0": None if None in l0s else float(np.mean(l0s)), "metrics": metrics,
            "uncertainties": uncertainties, "knob": tuple(records[0].get("knob") or (None, None)),
            "seed_values": seed_values, "with_metric": with_metric}


def build_frontiers(records: Sequence[dict], metrics: Sequence[str] | None = None) -> dict[str, dict]:
    """The baseline sweep's records as one frontier per metric (all metrics the records have,
    unless named): seeds of a knob value pooled, points sorted by L0."""
    knobs = {tuple(r["knob"])[0] for r in records}
    if len(knobs) != 1:
        raise HarnessError(f"a baseline sweep varies one knob; these runs vary {sorted(map(str, knobs)) or 'none'}")
    knob = next(iter(knobs))
    by_value: dict[Any, list[dict]] = {}
    for r in records:
        by_value.setdefault(tuple(r["knob"])[1], []).append(r)
    pooled = [pool_seeds(group) for group in by_value.values()]
    names = metrics if metrics is not None else sorted({n for p in pooled for n in p["metrics"]})
    frontiers = {}
    for name in names:
        points, excluded = [], []
        for p in pooled:
            where = f"{p['knob'][0]}={p['knob'][1]}"
            if p["l0"] is None or p["l0"] <= 0:  # log L0 needs L0 > 0; L0 0 is a dead SAE anyway
                excluded.append(f"{where}: L0 {p['l0']} is missing or not positive")
            elif p["metrics"].get(name) is None:
                excluded.append(f"{where}: no {name}")
            else:
                points.append({"l0": p["l0"], "value": p["metrics"][name],
                               "uncertainty": p["uncertainties"].get(name), "knob_value": p["knob"][1],
                               **p["with_metric"][name], "seed_values": p["seed_values"][name]})
        frontiers[name] = {"knob": knob, "points": sorted(points, key=lambda q: q["l0"]), "excluded": excluded,
                           "seed_spread": seed_spread([q["seed_values"] for q in points])}
    return frontiers


def interpolate(frontier: dict, l0: float) -> dict:
    """The frontier's value at `l0`: {"value", "uncertainty", "between": [knob values], "reason",
    "weights": [(point, weight)]}; value None, with the reason, outside the sweep's L0 range (never
    extrapolated)."""
    points = frontier["points"]
    if not points:
        return {"value": None, "uncertainty": None, "between": [], "reason": "the baseline has no points"}
    lo, hi = points[0]["l0"], points[-1]["l0"]
    if l0 is None or not lo <= l0 <= hi:
        return {"value": None, "uncertainty": None, "between": [],
                "reason": f"L0 {l0} is outside the baseline sweep's L0 range {lo:.4g}–{hi:.4g}"}
    for p in points:  # on a point: its own value (also avoids 0/0 between points of equal L0)
        if p["l0"] == l0:
            return {"value": p["value"], "uncertainty": p["uncertainty"], "between": [p["knob_value"]],
                    "reason": None, "weights": [(p, 1.0)]}
    i = next(i for i in range(len(points) - 1) if points[i]["l0"] < l0 < points[i + 1]["l0"])
    a, b = points[i], points[i + 1]
    t = (math.log(l0) - math.log(a["l0"])) / (math.log(b["l0"]) - math.log(a["l0"]))
    chord = (1 - t) * a["value"] + t * b["value"]
    # Interpolating the standard errors (not adding them in quadrature) keeps a point's own
    # uncertainty when t is 0 or 1; either unknown leaves it unknown.
    known = a["uncertainty"] is not None and b["uncertainty"] is not None
    return {"value": chord, "uncertainty": (1 - t) * a["uncertainty"] + t * b["uncertainty"] if known else None,
            "between": [a["knob_value"], b["knob_value"]], "reason": None, "weights": [(a, 1 - t), (b, t)],
            "chord_error": chord_error(points, i, l0, chord)}


def chord_error(points: list[dict], i: int, l0: float, chord: float) -> float | None:
    """How far the chord between points i and i + 1 lies from a parabola (in log L0) through them
    and a third point beside them, the larger of the two such parabolas (taking the nearer third
    point would jump at mid-interval); None where the sweep has no third point."""
    x = math.log(l0)
    errors = []
    for c in (points[j] for j in (i - 1, i + 2) if 0 <= j < len(points)):
        three = (points[i], points[i + 1], c)
        xs = [math.log(p["l0"]) for p in three]
        if len(set(xs)) == 3:
            parabola = sum(p["value"] * math.prod((x - xs[k]) / (xs[j] - xs[k]) for k in range(3) if k != j)
                           for j, p in enumerate(three))
            errors.append(abs(parabola - chord))
    return max(errors, default=None)


def fill_knob(knob: str, base: dict, parts: dict[str, float | None]) -> dict | None:
    """Where the chord's error is most of Δ's uncertainty, the knob value between the two points that
    would decide it: {"knob", "value" (their geometric mean), "side": "between", "text"}; else None."""
    chord = parts.get("interpolation") or 0.0
    if chord ** 2 <= sum(u * u for name, u in parts.items() if u and name != "interpolation"):
        return None
    a, b = base["between"]
    ends = sorted(x for x in map(_finite, (a, b)) if x is not None and x > 0)
    if len(ends) < 2:
        return None
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b))
    value = _two_significant(math.sqrt(ends[0] * ends[1]), whole)
    if not ends[0] < value < ends[1]:  # rounded onto or past an end: no point to add
        return None
    return {"knob": knob, "value": value, "side": "between",
            "text": f"add {knob}={value} (the sweep bends between {knob}={a} and {b}: its chord may be off by "
                    f"{chord:.2g} at this L0)"}


def _two_significant(x: float, whole: bool) -> float | int:
    rounded = float(f"{x:.2g}")
    return max(1, int(round(rounded))) if whole else rounded


def suggest_knob(frontier: dict, l0: float) -> dict:
    """The knob value to add so the sweep reaches `l0`: {"knob", "value", "side" ("below" or
    "above" the sweep), "text"} (value None, and why, when the knob cannot be followed in log space)."""
    name, points = frontier["knob"], frontier["points"]
    usable = [p for p in points if _finite(p["knob_value"]) is not None and p["knob_value"] > 0]
    if not usable:
        return {"knob": name, "value": None, "side": None,
                "text": f"no positive {name} in the sweep to extrapolate from"}
    whole = all(isinstance(p["knob_value"], int) and not isinstance(p["knob_value"], bool) for p in usable)
    below = l0 < usable[0]["l0"]
    ends = usable[:2] if below else usable[-2:]
    target = l0 / AIM_PAST if below else l0 * AIM_PAST
    prior = 1.0 if whole else -1.0  # d log L0 / d log knob: L0 ≈ k for TopK; L0 ∝ 1/penalty for L1
    slope = prior
    if len(ends) == 2 and ends[0]["knob_value"] != ends[1]["knob_value"] and ends[0]["l0"] != ends[1]["l0"]:
        fitted = ((math.log(ends[1]["l0"]) - math.log(ends[0]["l0"]))
                  / (math.log(ends[1]["knob_value"]) - math.log(ends[0]["knob_value"])))
        # A noisy pair with the wrong sign would send the knob the wrong way; a nearly flat one
        # (L0 barely moved across the sweep) would send it orders of magnitude off.
        if fitted * prior > 0 and abs(fitted) >= MIN_SLOPE:
            slope = fitted
    anchor = ends[0] if below else ends[-1]
    log_step = (math.log(target) - math.log(anchor["l0"])) / slope
    log_limit = max(math.log(MAX_KNOB_STEP), abs(math.log(target) - math.log(anchor["l0"])))
    value = _two_significant(anchor["knob_value"] * math.exp(max(-log_limit, min(log_limit, log_step))), whole)
    side = "below" if below else "above"
    return {"knob": name, "value": value, "side": side,
            "text": f"add {name}={value} (the run's L0 {l0:.4g} is {side} the sweep's "
                    f"{usable[0]['l0']:.4g}–{usable[-1]['l0']:.4g})"}


def _word(delta: float, uncertainty: float | None, higher_is_better: bool, needed: float = Z_BETTER) -> str:
    good = delta if higher_is_better else -delta
    if uncertainty is None:  # no noise estimate: only an exact tie is a tie, and the word says so
        return ("tied" if delta == 0 else "better" if good > 0 else "worse") + " (no uncertainty)"
    if good > needed * uncertainty:
        return "better"
    if good < -needed * uncertainty:
        return "worse"
    return "tied"


def standard_errors_needed(parts: dict[str, float | None], dofs: dict[str | tuple[str, ...], int]) -> float:
    """How many standard errors Δ must clear: Z_BETTER, or Student's t 97.5% quantile at the
    Welch–Satterthwaite degrees of freedom of Δ's uncertainty where that is more. A spread
    measured on a few seeds is itself uncertain (two seeds each: about 3 degrees of freedom, t 3.2);
    `dofs` maps a part, or a tuple of parts that are one estimate, to its degrees of freedom; a part
    without any (a bootstrap's) counts as exactly known."""
    from scipy.stats import t

    known = {name: u for name, u in parts.items() if u}
    groups = {names if isinstance(names, tuple) else (names,): dof for names, dof in dofs.items() if dof}
    spread = sum(sum(known.get(n, 0.0) ** 2 for n in names) ** 2 / dof for names, dof in groups.items())
    if not spread:
        return Z_BETTER
    return max(Z_BETTER, float(t.ppf(0.975, sum(u * u for u in known.values()) ** 2 / spread)))


def verdict(run: dict, frontiers: dict[str, dict], higher_is_better: dict[str, bool] | None = None,
            rows_of: Callable[[Any], dict | None] | None = None, score_of: Callable | None = None) -> dict:
    """Per metric of `frontiers`: {"run", "baseline", "delta", "uncertainty", "uncertainty_parts",
    "standard_errors_needed", "word", "higher_is_better", "between", "suggest", "seeds", "pairing",
    "convergence"}; `run` is a
    record (pooled or one seed). rows_of(folder) gives a run folder's per-context rows (or None) and
    score_of(metric) the metric from such rows (evals.score_of): with rows for the run and the
    points it is matched against, Δ's evaluation noise is a paired bootstrap (`paired_se`)."""
    directions = HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    l0 = _finite(run.get("l0"))
    out = {}
    for name, frontier in frontiers.items():
        if name not in directions:
            raise HarnessError(f"no direction for metric '{name}': say whether higher is better")
        value = _finite(run.get("metrics", {}).get(name))
        entry = {"run": value, "baseline": None, "delta": None, "uncertainty": None,
                 "uncertainty_parts": {}, "word": None, "higher_is_better": directions[name], "between": [],
                 "suggest": None, "seeds": {"run": list(_with_metric(run, name, "seeds", [run.get("seed")]))},
                 "pairing": None, "convergence": None}
        out[name] = entry
        if not frontier["points"]:
            entry["word"] = "no baseline"
            continue
        if value is None or l0 is None:
            entry["word"] = "no value"
            continue
        base = interpolate(frontier, l0)
        if base["value"] is None:
            entry.update(word=OUTSIDE, suggest=suggest_knob(frontier, l0))
            continue
        delta = value - base["value"]
        parts, dofs, pairing = _noise(name, run, base, frontier, rows_of, score_of)
        if base.get("chord_error") and any(u is not None for u in parts.values()):  # else: "(no uncertainty)"
            parts["interpolation"] = base["chord_error"]
        known = [u for u in parts.values() if u is not None]
        uncertainty = math.sqrt(sum(u * u for u in known)) if known else None
        needed = standard_errors_needed(parts, dofs)
        convergence = _with_metric(run, name, "convergence", None) or []  # a pooled record's list, one seed's dict
        converged = {"run": _converged([convergence] if isinstance(convergence, dict) else convergence),
                     "baseline": _converged([c for p, _ in base["weights"] for c in p["convergence"]]),
                     "threshold": CONVERGED_WITHIN}
        word = _word(delta, uncertainty, directions[name], needed)
        if False in (converged["run"], converged["baseline"]):
            word = "not converged"
        elif len(run.get("seed_values", {}).get(name) or entry["seeds"]["run"]) < 2:
            word = f"{word[:-1]}; one seed: provisional)" if word.endswith(")") else f"{word} (one seed: provisional)"
        entry.update(baseline=base["value"], delta=delta, uncertainty=uncertainty, between=base["between"],
                     uncertainty_parts=parts, standard_errors_needed=needed, word=word, pairing=pairing,
                     convergence=converged, suggest=fill_knob(frontier["knob"], base, parts) if word.startswith(
                         "tied") else None,
                     seeds={**entry["seeds"],
                            "baseline": {str(p["knob_value"]): p["seeds"] for p, _ in base["weights"]}})
    return out


def _with_metric(run: dict, name: str, what: str, lone: list) -> list:
    """A pooled record's seeds, folders or convergence that have metric `name` (pool_seeds); a
    record not pooled (one seed's) has its own, else `lone`."""
    if "with_metric" in run:
        return run["with_metric"].get(name, {}).get(what, [])
    return run.get(what, lone)


def _converged(found: Sequence[dict | None]) -> bool | None:
    """False if any of these runs was still moving (runs.convergence), True if every one is known
    to have converged, None where some are unknown (runs saved before convergence was recorded)."""
    flags = [c.get("converged") if isinstance(c, dict) else None for c in found]
    return False if False in flags else None if None in flags or not flags else True


def _noise(name: str, run: dict, base: dict, frontier: dict, rows_of, score_of) -> tuple[dict, dict, str]:
    """Δ's uncertainty parts, their degrees of freedom (for the seeds' parts: the seeds' less one;
    the context bootstrap's: the contexts' less one) and how the evaluation noise was measured: the paired bootstrap over
    the shared evaluation contexts plus each side's seed-to-seed spread where every folder has its
    per-context rows; else the unpaired standard errors in quadrature, as runs before pairing had.
    A synthetic run's evaluation reads the same fixed samples as its baselines' (synthetic.EVAL_SEED),
    and MCC none at all: only the seed-to-seed spread is left."""
    if "mcc" in run.get("metrics", {}):  # synthetic: every run is scored on the same samples; the noise is training's
        return *seed_parts(name, run, base, frontier), "paired: the same ground-truth samples for every run"
    sides = [(1.0, _with_metric(run, name, "folders", []))] + [(-w, p["folders"]) for p, w in base["weights"]]
    rows = [(w, [rows_of(f) if rows_of and f is not None else None for f in folders]) for w, folders in sides]
    rows = [(w, [r if r is None or name in r else None for r in group]) for w, group in rows]
    counts = {len(r[name]) for _, group in rows for r in group if r is not None}
    why = ("no scoring of per-context rows was given" if score_of is None else
           f"a run or baseline point has no per-context rows of {name} (saved before they were kept)"
           if not all(group and None not in group for _, group in rows) else
           "the runs were evaluated on different numbers of contexts" if len(counts) > 1 else None)
    if why:
        return *_unpaired_parts(name, run, base), f"unpaired: {why}"
    contexts = counts.pop()
    seeds, dofs = seed_parts(name, run, base, frontier)
    parts = {"contexts": paired_se(score_of(name), [(w, [r[name] for r in group]) for w, group in rows]), **seeds}
    return parts, {"contexts": contexts - 1, **dofs}, f"paired over {contexts} evaluation contexts"


def _unpaired_parts(name: str, run: dict, base: dict) -> tuple[dict, dict]:
    """The run's and the baseline's own standard errors, and the degrees of freedom of those taken
    across seeds (a lone seed's bootstrap counts as known; the baseline's, interpolated between two
    points, the fewer of theirs)."""
    run_seeds = len(run.get("seed_values", {}).get(name, []))
    base_dofs = [len(p["seed_values"]) - 1 for p, _ in base["weights"] if len(p["seed_values"]) > 1]
    dofs = {"run": run_seeds - 1 if run_seeds > 1 else 0, "baseline": min(base_dofs, default=0)}
    return ({"run": _finite(run.get("uncertainties", {}).get(name)), "baseline": base["uncertainty"]},
            {part: dof for part, dof in dofs.items() if dof})


def seed_parts(name: str, run: dict, base: dict, frontier: dict) -> tuple[dict, dict]:
    """The standard errors the seed-to-seed spread adds to each side's mean, and their degrees of
    freedom: its own spread where it has two seeds or more, else the other side's (the same training
    noise assumed), else None. The baseline's spread is its architecture's, pooled over every swept
    point with several seeds."""
    own = run.get("seed_values", {}).get(name, [])
    run_sd, run_dof = (float(np.std(own, ddof=1)), len(own) - 1) if len(own) > 1 else (None, 0)
    base_sd, base_dof = frontier["seed_spread"]["sd"], frontier["seed_spread"]["dof"]
    borrowed = (run_sd is None) != (base_sd is None)
    run_sd, run_dof, base_sd, base_dof = (run_sd if run_sd is not None else base_sd, run_dof or base_dof,
                                          base_sd if base_sd is not None else run_sd, base_dof or run_dof)
    parts = {"run_seeds": None if run_sd is None else run_sd / math.sqrt(max(1, len(own))),
             "baseline_seeds": None if base_sd is None else base_sd * math.sqrt(
                 sum(w * w / len(p["seed_values"]) for p, w in base["weights"]))}
    if borrowed:  # one spread measured once, on the lender's seeds: one estimate, not two
        return parts, {("run_seeds", "baseline_seeds"): run_dof}
    return parts, {"run_seeds": run_dof, "baseline_seeds": base_dof}


def seed_spread(groups: Sequence[Sequence[float]]) -> dict:
    """The seed-to-seed standard deviation pooled over groups (a swept point's seeds each):
    {"sd", "dof"}; sd None where no group has two seeds."""
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if not dof:
        return {"sd": None, "dof": 0}
    squares = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups if len(g) > 1)
    return {"sd": math.sqrt(squares / dof), "dof": dof}


def paired_se(statistic: Callable[[np.ndarray], float], sides: Sequence[tuple[float, Sequence[np.ndarray]]],
              resamples: int = 1000, seed: int = 0) -> float:
    """The standard error of Σ weight × (mean over a side's seeds of the metric), each side's
    per-context rows resampled with the same contexts (a paired bootstrap): with weights 1 for the
    run and −(1 − t), −t for the two baseline points it is interpolated between, the error of Δ."""
    n = len(sides[0][1][0])
    rng = np.random.default_rng(seed)  # seeded: the same runs always get the same verdict
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], rng.integers(0, n, size=(resamples, n))), 1)
    total = np.zeros(resamples)
    for weight, group in sides:  # every score is a function of its rows' sums: resampling sums the rows
        per_seed = []
        for rows in group:
            sums = (counts @ rows.reshape(n, -1)).reshape(resamples, 1, *rows.shape[1:])
            per_seed.append([statistic(summed) for summed in sums])
        total += weight * np.mean(per_seed, axis=0)
    return float(np.std(total, ddof=1))


def bootstrap_se(per_batch: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] | None = None,
                 resamples: int = 1000, seed: int = 0) -> float | None:
    """Standard error of a metric by bootstrap over evaluation batches, for a run with one seed:
    per_batch holds one value (or one row, for a ratio such as the CE-loss score) per batch;
    statistic maps resampled batches to the metric (default: their mean). None below 2 batches."""
    values = np.asarray(per_batch, dtype=float)
    if values.ndim == 0 or len(values) < 2:  # one batch has no spread to resample
        return None
    rng = np.random.default_rng(seed)  # seeded: the same run always gets the same verdict
    index = rng.integers(0, len(values), size=(resamples, len(values)))
    if statistic is None:
        estimates = values[index].mean(axis=1)
    else:
        estimates = np.array([statistic(values[row]) for row in index])
    return float(np.std(estimates, ddof=1))


# ----------------------------------------------------------------------------------------------
# A run's verdicts: against each baseline swept on the same activations.

def verdicts(info: dict, index: Index, plugin_name: str, knob_of: Callable[[str], str],
             run_dir: Path | None = None, score_of: Callable | None = None,
             defaults_of: Callable[[str], dict] | None = None) -> dict[str, Any]:
    """The run, pooled with its other seeds (`seeds_of`), against each baseline architecture swept
    on the same activations, at its L0: {baseline plugin: {metric: Δ, uncertainty, word, seeds,
    pairing, convergence}}. knob_of(baseline plugin) names the setting its architecture moves L0
    with (HarnessError where its plugin is gone); run_dir is the run's folder (its per-context rows
    and train log), None for a run judged from its final_info alone; score_of as `verdict`'s;
    defaults_of(baseline plugin): its hyperparameters' defaults, where only runs at them (the knob
    aside) are its sweep."""
    sweeps: dict[str, list[tuple[Path, dict]]] = {}
    for folder, who, other in index:
        if (who["study"] == "baseline" and other.get("status") == "completed" and other.get("metrics")
                and other.get("activation_cache") == info.get("activation_cache")):
            sweeps.setdefault(who["plugin"], []).append((folder, other))
    rows_of = functools.lru_cache(maxsize=None)(load_context_rows)
    seeds = [(info, run_dir), *((other, folder) for folder, other in seeds_of(info, index, run_dir))]
    run = pool_seeds(sorted((_record(i, "sparsity_penalty", folder) for i, folder in seeds),
                            key=lambda r: (r["seed"] is None, r["seed"] or 0)))
    found = {}
    for name, runs in sorted(sweeps.items()):
        if name == plugin_name:
            continue
        try:
            own_knob = knob_of(name)
            at_its_defaults = at_defaults(defaults_of(name), own_knob) if defaults_of else lambda other: True
        except HarnessError as exc:  # the baseline's plugin file is gone or broken: its knob is unknown
            found[name] = dict(not_judged=str(exc))
            continue
        if not (runs := [(folder, other) for folder, other in runs
                         if trained_alike(other, info) and at_its_defaults(other)]):
            found[name] = dict(not_judged=f"none of its runs was trained at this run's {', '.join(MATCHED_SETTINGS)}"
                                          + (" and its plugin's defaults" if defaults_of else ""))
            continue
        knob = swept_knob([other for _, other in runs], own_knob, unread_settings(own_knob))
        if knob is None:
            found[name] = dict(not_judged="its runs vary more than one setting: no frontier of one knob")
            continue
        records = [_record(other, knob, folder) for folder, other in runs]
        records = list({json.dumps([r["seed"], r["knob"][1]]): r for r in records}.values())  # the newest of each:
        # a run again, at a setting its loss does not read, is no second seed
        found[name] = dict(knob=knob, points=len(records), swept=list(dict.fromkeys(r["knob"][1] for r in records)),
                           metrics=verdict(run, build_frontiers(records), rows_of=rows_of, score_of=score_of))
    return found


def _record(info: dict, knob: str, folder: Path | None) -> dict:
    """record_from_final_info with the run's folder, and its convergence by the current rule."""
    return {**record_from_final_info(info, knob), "folder": folder, "convergence": run_convergence(folder, info)}


def seeds_of(info: dict, index: Index, run_dir: Path | None) -> list[tuple[Path, dict]]:
    """The run's other seeds in the index: completed runs of the same plugin code on the same
    activations whose config differs only in its seed (folder, final_info), its own folder aside."""
    def same(other: dict) -> bool:
        mine, theirs = info.get("provenance", {}), other.get("provenance", {})
        who = lambda i: [i.get("run", {}).get(k) for k in ("study", "plugin")]  # noqa: E731 (the title is prose)
        return (other.get("status") == "completed" and who(other) == who(info)
                and other.get("activation_cache") == info.get("activation_cache")
                and theirs.get("plugin_source_sha256") == mine.get("plugin_source_sha256")
                and theirs.get("seed") != mine.get("seed")
                and without_seed(theirs.get("config", {})) == without_seed(mine.get("config", {})))
    found = {other["provenance"]["seed"]: (folder, other) for folder, _, other in index
             if folder != run_dir and same(other)}  # the newest run of each seed
    return [found[seed] for seed in sorted(found)]


def without_seed(config: dict) -> str:
    """A config as training reads it, the seed aside: what a run's other seeds share."""
    return json.dumps({k: v for k, v in config.items() if k not in UNTRAINED}, sort_keys=True, default=str)


def at_defaults(defaults: dict, knob: str) -> Callable[[dict], bool]:
    """Whether a baseline run's hyperparameters, its knob aside, are its plugin's defaults (one saved
    before a hyperparameter existed has it at its default): a stray run at another setting on the
    same activations (a calibration, another objective) must not take its sweep's frontier away."""
    wanted = {name: _as_saved(value) for name, value in defaults.items() if name != knob}

    def at(info: dict) -> bool:
        saved = info.get("provenance", {}).get("config", {}).get("hyperparams", {})
        return all(_as_saved(saved.get(name, value)) == value for name, value in wanted.items())
    return at


def _as_saved(value: Any) -> Any:
    """A value as final_info.json holds it (tuples as lists, anything else JSON lacks as its str)."""
    return json.loads(json.dumps(value, default=str))


def trained_alike(baseline: dict, run: dict) -> bool:
    """Whether a baseline run shares the judged run's MATCHED_SETTINGS (runs saved without their
    config are not told apart)."""
    mine, theirs = (i.get("provenance", {}).get("config") for i in (run, baseline))
    return not (mine and theirs) or all(mine.get(k) == theirs.get(k) for k in MATCHED_SETTINGS)


def parent_hyperparams(run_values: dict, run_defaults: dict, parent_defaults: dict) -> dict:
    """The parent's hyperparameters at a run's setting: its own defaults, but what the run set away
    from the run plugin's defaults (`--set`) where the parent has that field too."""
    return {k: run_values[k] if k in run_values and run_values[k] != run_defaults.get(k) else default
            for k, default in parent_defaults.items()}


def _same_setting(parent: dict, run: dict, hyperparams: dict | None) -> bool:
    """Whether a parent run was trained at the child's setting: the same config but for what does
    not change training (seed aside), and, where given, these hyperparameters (parent_hyperparams):
    a sweep's other points are not the parent's seeds. Runs saved without a config are not told apart."""
    mine, theirs = (i.get("provenance", {}).get("config") for i in (run, parent))
    if not (mine and theirs):
        return True
    apart = {*UNTRAINED, "plugin", "hyperparams"}
    return (all(mine.get(k) == theirs.get(k) for k in (mine.keys() | theirs.keys()) - apart)
            and (hyperparams is None or _as_saved(theirs.get("hyperparams")) == _as_saved(hyperparams)))


def unread_settings(knob: str) -> tuple[str, ...]:
    """The run settings a baseline's loss does not read: sparsity_penalty, unless it is its knob (an
    architecture with a knob of its own has no L1 term)."""
    return () if knob == "sparsity_penalty" else ("sparsity_penalty",)


def swept_knob(infos: list[dict], default: str, unread: Sequence[str] = ()) -> str | None:
    """The one run setting or hyperparameter that varies across a baseline's runs (the seed and the
    `unread` settings aside; a hyperparameter some runs were saved without, from before it existed,
    varies only among the rest); the architecture's own knob where none does; None where several do
    (no frontier of one knob)."""
    configs = [other["provenance"]["config"] for other in infos]
    values = lambda key: {json.dumps(c[key] if key in c else c["hyperparams"][key])  # noqa: E731
                          for c in configs if key in c or key in c["hyperparams"]}
    varying = [k for k in dict.fromkeys((*SWEEPABLE, *(k for c in configs for k in c["hyperparams"])))
               if k not in unread and len(values(k)) > 1]
    return varying[0] if len(varying) == 1 else default if not varying else None


def matched(found: dict, metric: str | None = None) -> str:
    """A run's verdicts (final_info's `verdict`) on one metric, by default the CE-loss score (MCC
    for a synthetic run), each with its footing: 'run_0_topk: better (2 seeds v 2+2, paired over 32
    evaluation contexts, converged); run_0_batchtopk: outside its sweep'."""
    words = []
    for name, v in found.items():
        scores = v.get("metrics", {})
        entry = scores.get(metric or ("mcc" if "mcc" in scores else "ce_loss_score"), {})
        word = entry.get("word")
        if word:
            footing = footing_of(entry)
            words.append(f"{name}: {'outside its sweep' if word.startswith('outside') else word}"
                         + (f" ({footing})" if footing else ""))
    return "; ".join(words) or "no baseline sweep on these activations"


def footing_of(entry: dict) -> str:
    """What a judged verdict stands on: its seeds (the run's v each baseline point's), its pairing
    and its convergence, e.g. '2 seeds v 2+2, paired over 32 contexts, converged'; '' where
    nothing was judged (outside the sweep, no value) or for a verdict saved before these were kept."""
    if not entry.get("pairing"):
        return ""
    seeds = entry["seeds"]
    points = "+".join(str(len(s)) for s in seeds.get("baseline", {}).values())
    run = len(seeds["run"])
    state = entry["convergence"]
    moving = [side for side in ("run", "baseline") if state.get(side) is False]
    unknown = [side for side in ("run", "baseline") if state.get(side) is None]
    converged = (f"{' and '.join(moving)} still moving beyond {state['threshold']:.0%} over the last fifth" if moving
                 else f"convergence unknown for the {' and '.join(unknown)}" if unknown else "converged")
    return f"{run} seed{'s' if run != 1 else ''} v {points}, {entry['pairing']}, {converged}"


# ----------------------------------------------------------------------------------------------
# Sanity guards: results the seed notebooks reported without noticing, each a run's warning.

def suspicious(info: dict, run_dir: Path, parent_name: str | None, index: Index, parent_source: str | None = None,
               parent_setting: dict | None = None, presets: dict[str, dict] | None = None) -> list[str]:
    """Results the seed notebooks reported without noticing: each becomes a warning. parent_source:
    the parent plugin's current source hash (only a parent run of that source is a reference);
    parent_setting: its hyperparameters at this run's setting (parent_hyperparams); presets: the
    harness's, for its verdict budgets (`short_budget`)."""
    found = []
    sparsity = info.get("metrics", {}).get("sparsity", {})
    if sparsity.get("l0") == 0:
        found.append("L0 is 0: no latent fires on the evaluation text")
    log = read_json_lines(run_dir / "train_log.jsonl")
    if log[-1]["dead_fraction"] >= 1.0:
        found.append("every latent is dead at the end of training")
    if log[0]["total_loss"] == log[-1]["total_loss"]:
        found.append("the training loss never moved")
    quality = info.get("metrics", {}).get("reconstruction_quality", {})
    for key in ("explained_variance_whole_set", "explained_variance", "explained_variance_legacy"):
        if quality.get(key, 0.0) < 0:
            found.append(f"{key} is negative ({quality[key]:.3g}): worse than predicting the mean")
    parent = newest(index, parent_name, same_data_as=info) if parent_name else None
    if parent is not None and "metrics" in info and parent.get("metrics") == info["metrics"]:
        found.append(f"metrics identical to the last digit to parent {parent_name}'s latest run: "
                     "did the change reach the model?")
    moved = unmoved_decoder(run_dir, parent_name, info, index, parent_source, parent_setting) if parent_name else None
    same = no_measurable_effect(info, parent_name, index, parent_source, parent_setting) if parent_name else None
    short = short_budget(read_json(run_dir / "config.json"), presets or {})
    return found + inert_terms(log) + [w for w in (moved, same, short) if w]


VERDICT_PRESETS = ("embedded-4m",)  # budgets where a model's baselines were measured to settle (notes.md)


def short_budget(config: dict, presets: dict[str, dict]) -> str | None:
    """A warning for a run trained on fewer tokens of a verdict preset's model, layer and text than
    that preset's budget: judged all the same, but what it says is a first look."""
    for name in VERDICT_PRESETS:
        preset = presets.get(name)
        if preset and all(config.get(k) == preset[k] for k in ("model", "layer", "dataset")) \
                and config.get("tokens", 0) < preset["tokens"]:
            return (f"trained on {config['tokens']:,} tokens, under --preset {name}'s {preset['tokens']:,}, where the "
                    f"baselines were measured to settle: its verdicts are a first look, not a verdict")
    return None


# A decoder within this many float epsilons (relative) of the parent's differs by rounding alone:
# the same computation in another summation order ends about 1e-7 (relative, float32) away.
NOISE_EPSILONS = 100
INERT_SHARE = 1e-2  # a term below this share of the gradient norm it touches (median) cannot move the model


def unmoved_decoder(run_dir: Path, parent_name: str, info: dict, index: Index,
                    parent_source: str | None = None, parent_setting: dict | None = None) -> str | None:
    """A warning when the decoder ended within float noise (NOISE_EPSILONS of its dtype, relative)
    of the parent's newest completed run on the same activations, seed, dictionary size and setting, of
    the parent's current source where parent_source is given (an older parent is no reference), and
    whose weights are there (a kept run's are not: scripts/keep_runs.py)."""
    from safetensors.numpy import load_file

    seed, size = read_json(run_dir / "config.json")["seed"], info["dict_size"]
    for folder, who, other in reversed(index):
        provenance = other.get("provenance", {})
        if (who["plugin"] == parent_name and other.get("status") == "completed" and other.get("dict_size") == size
                and other.get("activation_cache") == info.get("activation_cache") and provenance.get("seed") == seed
                and parent_source in (None, provenance.get("plugin_source_sha256"))
                and _same_setting(other, info, parent_setting) and (folder / "plugin_state.safetensors").exists()):
            ours, theirs = (load_file(f / "plugin_state.safetensors")["W_dec"] for f in (run_dir, folder))
            change = float(np.linalg.norm(ours.astype(np.float64) - theirs) / np.linalg.norm(theirs.astype(np.float64)))
            noise = NOISE_EPSILONS * float(np.finfo(theirs.dtype).eps)
            if change > noise:
                return None
            return (f"the decoder ended {change:.2g} (relative) from parent {parent_name}'s on the same activations "
                    f"and seed, within float noise ({noise:.2g}): the change did not reach the model")
    return None


def inert_terms(log: list[dict]) -> list[str]:
    """A warning for each extra loss term whose median share of the gradient norm on the
    parameter entries it reaches (record_gradient_shares), over the logged steps, is below INERT_SHARE:
    a term that acts only at the start, or weighs in the loss with no gradient, is flagged too; one
    that is zero on most logged steps is said to be idle there, not too weak."""
    extra = [k for k in log[-1] if k.endswith("_loss") and k not in BASE_TERMS]
    found = []
    for term in extra:
        rows = [r for r in log if f"{term}_grad_share" in r]
        share = float(np.median([r[f"{term}_grad_share"] for r in rows])) if rows else None
        if share is None or share >= INERT_SHARE:
            continue
        idle = sum(r.get(term) == 0 for r in rows)
        found.append(f"{term} is a median {100 * share:.2g}% of the gradient norm on the parameter entries it "
                     f"reaches ({len(rows)} logged steps): " + (
                         "it was zero on every one of them: it never acted" if idle == len(rows) else
                         f"it was zero on {idle} of them (a term that acts only when its condition holds, as AuxK "
                         "on dead latents, acted on the rest)" if 2 * idle > len(rows) else
                         "it cannot change the model; raise its weight"))
    return found


# The headline metrics a run must move beyond its parent's seed-to-seed spread to show an effect
# (on a synthetic preset, its ground-truth ones).
EFFECT_METRICS = {"CE-loss score": ("model_performance_preservation", "ce_loss_score"),
                  "explained variance": ("reconstruction_quality", "explained_variance_whole_set"),
                  "L0": ("sparsity", "l0")}
GROUND_TRUTH_EFFECT_METRICS = {"MCC": ("ground_truth", "mcc"), "F1": ("ground_truth", "f1"),
                               "L0": ("sparsity", "l0")}
EFFECT_SPREADS = 2.0  # standard deviations across the parent's seeds


def no_measurable_effect(info: dict, parent_name: str, index: Index, parent_source: str | None = None,
                         parent_setting: dict | None = None) -> str | None:
    """A warning where the parent has completed runs at two or more seeds (the newest of each) on
    the same activations, dictionary size and setting, of its current source where given, and every
    EFFECT_METRICS value (GROUND_TRUTH_EFFECT_METRICS' on a synthetic preset) of this run lies within
    EFFECT_SPREADS of their standard deviations across seeds from their mean."""
    by_seed = {}
    for _, who, other in index:  # oldest first: the newest run of each seed stays
        provenance = other.get("provenance", {})
        if (who["plugin"] == parent_name and other.get("status") == "completed" and other.get("metrics")
                and other.get("activation_cache") == info.get("activation_cache")
                and other.get("dict_size") == info.get("dict_size") and _same_setting(other, info, parent_setting)
                and parent_source in (None, provenance.get("plugin_source_sha256"))):
            by_seed[provenance.get("seed")] = other["metrics"]
    if len(by_seed) < 2 or "metrics" not in info:
        return None
    readings = []
    headlines = GROUND_TRUTH_EFFECT_METRICS if "ground_truth" in info["metrics"] else EFFECT_METRICS
    for name, (group, key) in headlines.items():
        ours = _finite(info["metrics"].get(group, {}).get(key))
        theirs = [v for m in by_seed.values() if (v := _finite(m.get(group, {}).get(key))) is not None]
        if ours is None or len(theirs) < 2:
            return None
        mean, spread = float(np.mean(theirs)), float(np.std(theirs, ddof=1))
        if abs(ours - mean) > EFFECT_SPREADS * spread:
            return None
        readings.append(f"{name} {ours:.4g} (parent {mean:.4g} ± {spread:.2g})")
    return (f"no measurable effect: every headline metric is within {EFFECT_SPREADS:g} seed-to-seed standard "
            f"deviations of parent {parent_name}'s {len(by_seed)} seeds: " + ", ".join(readings))
