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
"seed": int, "uncertainties": {name: float}}; "uncertainties" (e.g. `bootstrap_se` over its
evaluation batches) and "seed" are optional. Records of one knob value but several seeds are pooled
(`pool_seeds`): the point is their mean and its uncertainty the standard error across seeds; a
single seed keeps its own uncertainty, or None.

A frontier is {"knob": name, "points": [{"l0", "value", "uncertainty", "knob_value", "seeds"}]}
sorted by L0, plus "excluded": why a record was left out (L0 not positive, value missing).

The rules:
- `interpolate`: linear in log L0 between the two points that bracket the L0 (its uncertainty is
  the same interpolation of theirs); never extrapolated: outside the sweep's L0 range it gives
  value None and the reason.
- Δ = run − baseline, raw, in the metric's own units and sign; the word carries the direction
  (`higher_is_better`, default `HIGHER_IS_BETTER`).
- Δ's uncertainty: the run's and the baseline's in quadrature. A missing part counts as zero
  (entry["uncertainty_parts"] shows which are known); with neither known it is None.
- The word: "better" if Δ is beyond Z_BETTER (2) uncertainties in the good direction, "worse" if
  in the bad one, else "tied". With no uncertainty, "tied" only on exact equality, and the word
  ends in " (no uncertainty)". Outside the sweep: "outside the baseline sweep: widen it", with
  entry["suggest"], the knob value to add: the sweep's two end points on the run's side, fitted as
  a line in log(knob) against log(L0) and followed to AIM_PAST (1.25×) beyond the run's L0 (a one-point
  sweep, or a fit with the wrong slope, assumes L0 ∝ k for a whole-number knob and L0 ∝
  1/penalty otherwise), rounded to 2 significant digits. "no baseline" / "no value" when the
  frontier or the run lacks the metric.

Which runs make up the baseline (same model, layer, activations, dictionary size) is the caller's
choice; nothing here checks it. The run's L0 is taken as exact (its noise is not propagated).

Below the rules: `verdicts`, a run judged against every baseline swept on its activations (read
from the run index), and `suspicious`, the sanity guards whose findings become a run's warnings."""

from __future__ import annotations

from common import HarnessError  # first: its import guards

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runs import BASE_TERMS, Index, newest, read_json, read_json_lines

# The run settings a sweep may vary (besides a plugin's hyperparameters).
SWEEPABLE = ("dict_size", "tokens", "batch_size", "lr", "sparsity_penalty", "warmup_steps", "layer")

Z_BETTER = 2.0  # Δ must clear two standard errors to count as a difference
OUTSIDE = "outside the baseline sweep: widen it"
# Aim the suggested knob a quarter beyond the run's L0: aimed exactly at it, run-to-run noise
# leaves the new point short of the run about half the time, and the run stays unbracketed.
AIM_PAST = 1.25
# Below this |d log L0 / d log knob| the sweep's own slope is not trusted for a suggestion.
MIN_SLOPE = 0.1
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
            "seed": info.get("provenance", {}).get("seed"), "uncertainties": uncertainties}


def pool_seeds(records: Sequence[dict]) -> dict:
    """Several seeds of one configuration as one record: mean L0, mean of each metric, and as its
    uncertainty the standard error across seeds (a lone seed keeps its own, or None)."""
    if not records:
        raise HarnessError("no runs to pool")
    l0s = [_finite(r.get("l0")) for r in records]
    names = sorted({name for r in records for name in r.get("metrics", {})})
    metrics, uncertainties = {}, {}
    for name in names:
        values = [(v, r) for r in records if (v := _finite(r.get("metrics", {}).get(name))) is not None]
        if not values:
            metrics[name] = None
            continue
        metrics[name] = float(np.mean([v for v, _ in values]))
        if len(values) > 1:  # the spread across seeds is the honest uncertainty: it includes training noise
            uncertainties[name] = float(np.std([v for v, _ in values], ddof=1) / math.sqrt(len(values)))
        elif (own := _finite(values[0][1].get("uncertainties", {}).get(name))) is not None:
            uncertainties[name] = own
    return {"l0": None if None in l0s else float(np.mean(l0s)), "metrics": metrics,
            "uncertainties": uncertainties, "knob": tuple(records[0].get("knob") or (None, None)),
            "seeds": [r.get("seed") for r in records]}


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
                               "seeds": p["seeds"]})
        frontiers[name] = {"knob": knob,
                           "points": sorted(points, key=lambda q: q["l0"]), "excluded": excluded}
    return frontiers


def interpolate(frontier: dict, l0: float) -> dict:
    """The frontier's value at `l0`: {"value", "uncertainty", "between": [knob values], "reason"};
    value None, with the reason, outside the sweep's L0 range (never extrapolated)."""
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
                    "reason": None}
    i = next(i for i in range(len(points) - 1) if points[i]["l0"] < l0 < points[i + 1]["l0"])
    a, b = points[i], points[i + 1]
    t = (math.log(l0) - math.log(a["l0"])) / (math.log(b["l0"]) - math.log(a["l0"]))
    # Interpolating the standard errors (not adding them in quadrature) keeps a point's own
    # uncertainty when t is 0 or 1; either unknown leaves it unknown.
    known = a["uncertainty"] is not None and b["uncertainty"] is not None
    return {"value": (1 - t) * a["value"] + t * b["value"],
            "uncertainty": (1 - t) * a["uncertainty"] + t * b["uncertainty"] if known else None,
            "between": [a["knob_value"], b["knob_value"]], "reason": None}


def _two_significant(x: float, whole: bool) -> float | int:
    rounded = float(f"{x:.2g}")
    return max(1, int(round(rounded))) if whole else rounded


def suggest_knob(frontier: dict, l0: float) -> dict:
    """The knob value to add so the sweep reaches `l0`: {"knob", "value", "text"} (value None, and
    why, when the knob cannot be followed in log space)."""
    name, points = frontier["knob"], frontier["points"]
    usable = [p for p in points if _finite(p["knob_value"]) is not None and p["knob_value"] > 0]
    if not usable:
        return {"knob": name, "value": None, "text": f"no positive {name} in the sweep to extrapolate from"}
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
    value = _two_significant(
        anchor["knob_value"] * math.exp((math.log(target) - math.log(anchor["l0"])) / slope), whole)
    side = "below" if below else "above"
    return {"knob": name, "value": value,
            "text": f"add {name}={value} (the run's L0 {l0:.4g} is {side} the sweep's "
                    f"{usable[0]['l0']:.4g}–{usable[-1]['l0']:.4g})"}


def _word(delta: float, uncertainty: float | None, higher_is_better: bool) -> str:
    good = delta if higher_is_better else -delta
    if uncertainty is None:  # no noise estimate: only an exact tie is a tie, and the word says so
        return ("tied" if delta == 0 else "better" if good > 0 else "worse") + " (no uncertainty)"
    if good > Z_BETTER * uncertainty:
        return "better"
    if good < -Z_BETTER * uncertainty:
        return "worse"
    return "tied"


def verdict(run: dict, frontiers: dict[str, dict], higher_is_better: dict[str, bool] | None = None) -> dict:
    """Per metric of `frontiers`: {"run", "baseline", "delta", "uncertainty", "uncertainty_parts",
    "word", "higher_is_better", "between", "suggest"}; `run` is a record (pooled or one seed)."""
    directions = HIGHER_IS_BETTER if higher_is_better is None else higher_is_better
    l0 = _finite(run.get("l0"))
    out = {}
    for name, frontier in frontiers.items():
        if name not in directions:
            raise HarnessError(f"no direction for metric '{name}': say whether higher is better")
        value = _finite(run.get("metrics", {}).get(name))
        entry = {"run": value, "baseline": None, "delta": None, "uncertainty": None,
                 "uncertainty_parts": {"run": None, "baseline": None}, "word": None,
                 "higher_is_better": directions[name], "between": [], "suggest": None}
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
        own = _finite(run.get("uncertainties", {}).get(name))
        parts = [u for u in (own, base["uncertainty"]) if u is not None]
        uncertainty = math.sqrt(sum(u * u for u in parts)) if parts else None
        delta = value - base["value"]
        entry.update(baseline=base["value"], delta=delta, uncertainty=uncertainty, between=base["between"],
                     uncertainty_parts={"run": own, "baseline": base["uncertainty"]},
                     word=_word(delta, uncertainty, directions[name]))
    return out


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

def verdicts(info: dict, index: Index, plugin_name: str, knob_of: Callable[[str], str]) -> dict[str, Any]:
    """The run against each baseline architecture swept on the same activations, at the run's L0:
    {baseline plugin: {metric: Δ, uncertainty, better/tied/worse}}. knob_of(baseline plugin)
    names the setting its architecture moves L0 with (HarnessError where its plugin is gone)."""
    sweeps: dict[str, list[dict]] = {}
    for _, who, other in index:
        if (who["study"] == "baseline" and other.get("status") == "completed" and other.get("metrics")
                and other.get("activation_cache") == info.get("activation_cache")):
            sweeps.setdefault(who["plugin"], []).append(other)
    found = {}
    for name, infos in sorted(sweeps.items()):
        if name == plugin_name:
            continue
        try:
            knob = swept_knob(infos, knob_of(name))
        except HarnessError as exc:  # the baseline's plugin file is gone or broken: its knob is unknown
            found[name] = dict(not_judged=str(exc))
            continue
        if knob is None:
            found[name] = dict(not_judged="its runs vary more than one setting: no frontier of one knob")
            continue
        records = [record_from_final_info(other, knob) for other in infos]
        run = record_from_final_info(info, "sparsity_penalty")
        found[name] = dict(knob=knob, points=len(infos), metrics=verdict(run, build_frontiers(records)))
    return found


def swept_knob(infos: list[dict], default: str) -> str | None:
    """The one run setting or hyperparameter that varies across a baseline's runs (the seed aside);
    the architecture's own knob where none does; None where several do (no frontier of one knob)."""
    configs = [other["provenance"]["config"] for other in infos]
    values = lambda key: {json.dumps(c.get(key, c["hyperparams"].get(key))) for c in configs}  # noqa: E731
    varying = [k for k in (*SWEEPABLE, *configs[0]["hyperparams"]) if len(values(k)) > 1]
    return varying[0] if len(varying) == 1 else default if not varying else None


def matched(found: dict, metric: str | None = None) -> str:
    """A run's verdicts (final_info's `verdict`) on one metric, by default the CE-loss score (MCC
    for a synthetic run): 'run_0_topk: better; run_0_gated: tied; run_0_batchtopk: outside its sweep'."""
    words = []
    for name, v in found.items():
        scores = v.get("metrics", {})
        word = scores.get(metric or ("mcc" if "mcc" in scores else "ce_loss_score"), {}).get("word")
        if word:
            words.append(f"{name}: {'outside its sweep' if word.startswith('outside') else word}")
    return "; ".join(words) or "no baseline sweep on these activations"


# ----------------------------------------------------------------------------------------------
# Sanity guards: results the seed notebooks reported without noticing, each a run's warning.

def suspicious(info: dict, run_dir: Path, parent_name: str | None, index: Index,
               parent_source: str | None = None) -> list[str]:
    """Results the seed notebooks reported without noticing: each becomes a warning. parent_source:
    the parent plugin's current source hash (only a parent run of that source is a reference)."""
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
    moved = unmoved_decoder(run_dir, parent_name, info, index, parent_source) if parent_name else None
    same = no_measurable_effect(info, parent_name, index, parent_source) if parent_name else None
    return found + inert_terms(log) + [w for w in (moved, same) if w]


# A decoder within this many float epsilons (relative) of the parent's differs by rounding alone:
# the same computation in another summation order ends about 1e-7 (relative, float32) away.
NOISE_EPSILONS = 100
INERT_SHARE = 1e-2  # a term below this share of the gradient norm it touches (median) cannot move the model


def unmoved_decoder(run_dir: Path, parent_name: str, info: dict, index: Index,
                    parent_source: str | None = None) -> str | None:
    """A warning when the decoder ended within float noise (NOISE_EPSILONS of its dtype, relative)
    of the parent's newest completed run on the same activations, seed and dictionary size, of
    the parent's current source where parent_source is given (an older parent is no reference)."""
    from safetensors.numpy import load_file

    seed, size = read_json(run_dir / "config.json")["seed"], info["dict_size"]
    for folder, who, other in reversed(index):
        provenance = other.get("provenance", {})
        if (who["plugin"] == parent_name and other.get("status") == "completed" and other.get("dict_size") == size
                and other.get("activation_cache") == info.get("activation_cache") and provenance.get("seed") == seed
                and parent_source in (None, provenance.get("plugin_source_sha256"))):
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
    parameters it reaches (record_gradient_shares), over the logged steps, is below INERT_SHARE:
    a term that acts only at the start, or weighs in the loss with no gradient, is flagged too."""
    extra = [k for k in log[-1] if k.endswith("_loss") and k not in BASE_TERMS]
    found = []
    for term in extra:
        shares = [r[f"{term}_grad_share"] for r in log if f"{term}_grad_share" in r]
        if shares and float(np.median(shares)) < INERT_SHARE:
            found.append(f"{term} is a median {100 * float(np.median(shares)):.2g}% of the gradient norm on the "
                         f"parameters it reaches ({len(shares)} logged steps): it cannot change the model; "
                         "raise its weight")
    return found


# The headline metrics a run must move beyond its parent's seed-to-seed spread to show an effect.
EFFECT_METRICS = {"CE-loss score": ("model_performance_preservation", "ce_loss_score"),
                  "explained variance": ("reconstruction_quality", "explained_variance_whole_set"),
                  "L0": ("sparsity", "l0")}
EFFECT_SPREADS = 2.0  # standard deviations across the parent's seeds


def no_measurable_effect(info: dict, parent_name: str, index: Index, parent_source: str | None = None) -> str | None:
    """A warning where the parent has completed runs at two or more seeds (the newest of each) on
    the same activations and dictionary size, of its current source where given, and every
    EFFECT_METRICS value of this run lies within EFFECT_SPREADS of their standard deviations
    across seeds from their mean."""
    by_seed = {}
    for _, who, other in index:  # oldest first: the newest run of each seed stays
        provenance = other.get("provenance", {})
        if (who["plugin"] == parent_name and other.get("status") == "completed" and other.get("metrics")
                and other.get("activation_cache") == info.get("activation_cache")
                and other.get("dict_size") == info.get("dict_size")
                and parent_source in (None, provenance.get("plugin_source_sha256"))):
            by_seed[provenance.get("seed")] = other["metrics"]
    if len(by_seed) < 2 or "metrics" not in info:
        return None
    readings = []
    for name, (group, key) in EFFECT_METRICS.items():
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
