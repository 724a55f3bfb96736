"""The GPU check (issue 16; scripts/gpu_check.sh runs it): the CUDA-marked tests, then the synthetic
bench of every baseline architecture against SAELens's at the field's reference shape (d_in 2304,
d_sae 16384, batch 4096; no LLM) in fp32 (TF32 on CUDA, as training sets it) and bf16, each with our
sparse step forced off and on, into one JSON, rewritten after each part so that a check cut short
keeps what it measured. Without CUDA, its CPU form: the CUDA tests skipped, small shapes."""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the harness's modules sit one folder up

import torch  # noqa: E402

try:
    import bench  # noqa: E402  (first of the harness: experiment's import guards)
    import experiment  # noqa: E402
    import kernels  # noqa: E402
    IMPORT_ERROR = None
except Exception:  # a package the machine lacks, or has in a version that breaks: the JSON says which
    IMPORT_ERROR = traceback.format_exc()

SHAPES = {  # the synthetic bench's d_in, d_sae, batch and timed steps per round (three rounds)
    "cuda": dict(d_in=2304, dict_size=16384, batch_size=4096, steps=10),
    "cpu": dict(d_in=64, dict_size=256, batch_size=256, steps=2),
}
L0_FRACTION = 0.02  # the encoder bias placed so that ~2% of latents fire before the activation (TopK: k decides)
TESTS_TIMEOUT_S = 300
BENCH_BUDGET_S = 420  # no bench part starts after this, so that the whole check stays within 8 minutes
PACKAGES = ("torch", "transformers", "transformer-lens", "sae-lens", "sae-bench", "datasets", "numpy", "typer",
            "rich", "safetensors")


def main() -> None:
    started = time.perf_counter()
    out = Path(os.environ.get("OUT") or ROOT) / "gpu_check.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = dict(device=device.type, environment=environment(), finished=False)
    if IMPORT_ERROR:
        write(out, {**report, "import_error": IMPORT_ERROR[-4000:]})
        sys.exit(f"gpu check: the harness does not import here; see {out}")
    report["device_name"] = bench.device_name(device)
    write(out, report)
    report["cuda_tests"] = cuda_tests()
    write(out, report)
    report["bench"] = {}
    for dtype in kernels.STEP_DTYPES:
        for path in ("dense", "sparse"):
            part = f"{dtype}_{path}"
            if time.perf_counter() - started > BENCH_BUDGET_S:
                report["bench"][part] = dict(skipped=f"not started: the check had run {BENCH_BUDGET_S} s")
                continue
            report["bench"][part] = synthetic_bench(dtype, path, SHAPES[device.type])
            write(out, report)
    report.update(summary=summary(report["bench"]), finished=True, wall_s=round(time.perf_counter() - started, 1))
    write(out, report)
    print(f"CUDA tests: {report['cuda_tests']['counts']}")
    for row in report["summary"]:
        print(" ".join(f"{key}={value}" for key, value in row.items()))
    print(f"gpu check: {out} ({report['wall_s']} s)")


def write(out: Path, report: dict) -> None:
    """Whole or not at all: a check cut short leaves the last part's JSON."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)


def environment() -> dict:
    """What ran: Python, torch and CUDA, the packages the harness needs (carried or the machine's),
    and whether pip finds them consistent."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    return dict(python=platform.python_version(), torch_cuda=torch.version.cuda, packages=versions,
                carried_wheels=len(list((ROOT / ".whl").glob("*.whl"))), pythonpath=os.environ.get("PYTHONPATH"),
                pip_check=(check.stdout + check.stderr).strip()[-3000:], torch_threads=torch.get_num_threads())


def cuda_tests() -> dict:
    """`pytest -m cuda tests/test_gpu_check.py`, in its own process: each test's outcome and message."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "SAE_HARNESS_CACHE": str(Path(tmp) / "cache")}
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", "tests/test_gpu_check.py"]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
            exit_code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            exit_code, output = None, f"timed out after {TESTS_TIMEOUT_S} s: {exc.stdout or ''}"
        cases = junit_cases(junit) if junit.exists() else []
    counts = collections.Counter(case["outcome"] for case in cases)
    return dict(exit_code=exit_code, wall_s=round(time.perf_counter() - started, 1),
                counts={outcome: counts[outcome] for outcome in ("passed", "failed", "error", "skipped")},
                cases=cases, output_tail=str(output)[-4000:])


OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # junit's tags: pytest's words


def junit_cases(junit: Path) -> list[dict]:
    cases = []
    for case in ElementTree.parse(junit).iter("testcase"):
        found = {child.tag: child for child in case}
        tag = next((tag for tag in OUTCOMES if tag in found), None)
        outcome, message = (OUTCOMES[tag], found[tag].get("message", "")) if tag else ("passed", "")
        cases.append(dict(name=case.get("name"), outcome=outcome, seconds=float(case.get("time", 0)),
                          message=message[:2000]))
    return cases


def synthetic_bench(dtype: str, path: str, shape: dict) -> dict:
    """bench.py --activations random over every baseline (with the sparse step forced on: those that
    have one); an error is recorded, not raised, so that the other parts still run."""
    try:
        cfgs = bench.bench_configs("embedded", None, "random", [], tokens=shape["batch_size"], device="auto",
                                   compile=False, dtype=dtype, dict_size=shape["dict_size"],
                                   batch_size=shape["batch_size"])
        if path == "sparse":
            cfgs = [cfg for cfg in cfgs if takes_sparse_step(cfg)]
        return bench.run_synthetic(cfgs, shape["d_in"], shape["steps"], L0_FRACTION, path)
    except Exception as exc:  # a CUDA failure in one part is a result too
        return dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])


def takes_sparse_step(cfg: experiment.RunConfig) -> bool:
    plugin = experiment.find_plugin(cfg.plugin)
    return plugin.sae_class(8, 16, plugin.hyperparams_class(**cfg.hyperparams), cfg).takes_sparse_step()


def summary(parts: dict) -> list[dict]:
    """One row per part and architecture: the numbers the README's GPU row needs."""
    rows = []
    for part, results in parts.items():
        for name, row in results.get("architectures", {}).items():
            rows.append(dict(part=part, architecture=name, path=row["sae_step"]["path"],
                             ours_tokens_per_s=round(row["sae_step"]["tokens_per_s"]),
                             sae_lens_tokens_per_s=round(row["sae_lens_step"]["tokens_per_s"]),
                             ours_vs_sae_lens=round(row["ours_vs_sae_lens"], 3),
                             roofline_fraction=round(row["sae_step_roofline_fraction"], 3),
                             roofline=f"{results['roofline_flops'] / 1e12:.1f} TFLOP/s {results['roofline_dtype']}"))
    return rows


if __name__ == "__main__":
    main()
