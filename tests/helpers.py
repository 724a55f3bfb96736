"""What several test modules share: running the tiny preset, the CLI in-process, reading a run's
log and real tiny-model activations, comparisons of tensors and states, the imports of a source
file. Fixtures live in conftest.py; this module holds plain functions and constants only."""

import ast
import copy
import functools
import json
import math
from pathlib import Path

import torch
from typer.testing import CliRunner

import experiment
import sources

ROOT = Path(experiment.__file__).resolve().parent
TOPK_FAMILY = ["baseline/run_0_topk", "baseline/run_0_batchtopk", "baseline/run_0_matryoshka"]


def tiny_run(plugin: str, out: Path, notes: Path, *, hyperparams=None, **overrides) -> dict:
    """Train and evaluate `plugin` on the tiny preset; returns final_info.json's content."""
    found = experiment.find_plugin(plugin)
    cfg = experiment.build_config("tiny", f"{found.study}/{found.name}", **overrides)
    cfg.hyperparams = hyperparams or {}
    experiment.execute(cfg, found, out, notes)
    return json.loads((out / "final_info.json").read_text())


def cli(*args: str):
    """Invoke the CLI in-process; returns the result (exit_code, output)."""
    return CliRunner().invoke(experiment.app, list(args))


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@functools.cache
def tiny_model_activations(n_contexts: int) -> torch.Tensor:
    """Real activations of the tiny model at blocks.1.hook_resid_post on synthetic text, BOS
    dropped as in harvest: (n_contexts, 31, 64), in the model's own scale."""
    model = sources.load_model("tiny", torch.device("cpu"))
    contexts = sources.synthetic_contexts(n_contexts, 32, model.cfg.d_vocab)
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=[hook])
    return cache[hook][:, 1:].float()


def assert_same_state(module, twin) -> None:
    """The same state-dict keys, and every tensor equal to the last bit."""
    twin_state = twin.state_dict()
    assert module.state_dict().keys() == twin_state.keys()
    for name, value in module.state_dict().items():
        assert torch.equal(value, twin_state[name]), name


def assert_close_in_norm(ours, theirs, what, rtol=1e-5, names=("ours", "SAELens")) -> None:
    """The same shape, and |ours - theirs| <= rtol |theirs| in norm over the whole tensor (in
    float64: summation orders differ between implementations, so no element-wise tolerance)."""
    assert ours.shape == theirs.shape, what
    diff, size = (ours.double() - theirs.double()).norm().item(), theirs.double().norm().item()
    assert diff <= rtol * size, f"{what}: |{names[0]} - {names[1]}| = {diff:.3g}, |{names[1]}| = {size:.3g}"


def imported_modules(tree: ast.Module, before_line: float = math.inf) -> set[str]:
    """The top-level names of every module a file's syntax tree imports, at module level or
    inside a function (relative imports aside), on its lines before `before_line`."""
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) >= before_line:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def family_sae(key: str, n_dead: int, d_in=64, d_sae=512, k=8, dead_steps=10):
    """A TopK-family SAE away from its initial biases, n_dead latents past the dead window."""
    plugin = experiment.find_plugin(key)
    torch.manual_seed(0)
    hp = plugin.hyperparams_class(k=k, dead_steps=dead_steps)
    sae = plugin.sae_class(d_in, d_sae, hp, experiment.build_config("tiny", key))
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(d_in, d_sae))
        sae.b_enc.copy_(0.5 * torch.randn(d_sae) - 1.0)
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
        sae.steps_since_fired[torch.randperm(d_sae)[:n_dead]] = dead_steps + 5
    return sae


def loss_and_gradients(sae, x, sparse: bool, step=20):
    """One training pass of a copy of `sae` on the sparse or the dense path: its loss terms and
    total, and every parameter's gradient of the total."""
    sae = copy.deepcopy(sae).train()  # observe() moves running statistics: each path gets its own
    sae.sparse_backward = sparse
    pre = sae.training_pass(x, step).pre
    assert (type(pre.grad_fn).__name__ == "SparseBackwardPreBackward") is sparse
    out = sae.loss(x, step)
    total = sum(out.terms.values())
    total.backward()
    return out.terms | {"total": total}, {name: p.grad for name, p in sae.named_parameters()}


def assert_sparse_step_is_the_dense_step(sae, x) -> tuple[dict, dict]:
    """The sparse path gives the dense path's loss terms and every gradient, to 1e-5 relative in
    norm (summation orders differ); returns the dense path's (terms, gradients)."""
    (dense_terms, dense_grads), (sparse_terms, sparse_grads) = (loss_and_gradients(sae, x, s) for s in (False, True))
    assert set(sparse_terms) == set(dense_terms)
    for name, term in dense_terms.items():
        assert_close_in_norm(sparse_terms[name], term, name, names=("sparse", "dense"))
    for name, grad in dense_grads.items():
        assert_close_in_norm(sparse_grads[name], grad, f"grad {name}", names=("sparse", "dense"))
    return dense_terms, dense_grads
