"""The fast core: the SAE, the trainer's hooks, the cache key, plugin loading and the layout of
the code, on tiny tensors. `python -m pytest -q tests/test_core.py` runs in well under a minute;
run it on every change (the full suite is what CI runs)."""

import ast
import dataclasses
import math

import pytest
import torch
from helpers import ROOT, imported_modules

import experiment
from runs import save_sae
import kernels

CFG = experiment.build_config("tiny", "baseline/run_0_baseline")


def base_sae(d_in=16, d_sae=64, seed=0, cls=experiment.SAE, hp=None):
    torch.manual_seed(seed)
    return cls(d_in, d_sae, hp or experiment.Hyperparams(), CFG)


# ---- the SAE is its formula ------------------------------------------------------------------

def test_encode_and_decode_are_the_docstring_formula():
    sae = base_sae()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(8, 16)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f, rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec, rtol=0, atol=0)
    torch.testing.assert_close(sae(x), sae.decode(f), rtol=0, atol=0)


def test_loss_is_reconstruction_plus_l1_plus_the_plugins_extra_terms():
    class Extra(experiment.SAE):
        def aux_losses(self, fwd):
            fwd.stats["seen_step"] = fwd.step
            return {"extra_loss": fwd.f.sum() * 0 + 1.5}

    sae, x = base_sae(cls=Extra), torch.randn(8, 16)
    out = sae.loss(x, 7)
    f = sae.encode(x)
    assert set(out.terms) == {"l2_loss", "sparsity_loss", "extra_loss"} and out.stats == {"seen_step": 7}
    torch.testing.assert_close(out.terms["l2_loss"], (x - sae.decode(f)).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.terms["sparsity_loss"], CFG.sparsity_penalty * f.abs().sum(-1).mean())
    torch.testing.assert_close(out.latents, f)


def test_an_architecture_without_a_sparsity_penalty_logs_no_such_term():
    class Constrained(experiment.SAE):
        def sparsity_loss(self, fwd):
            return None

    assert set(base_sae(cls=Constrained).loss(torch.randn(8, 16), 0).terms) == {"l2_loss"}


def test_observe_runs_in_training_only_before_the_terms_and_without_gradients():
    calls = []

    class Watch(experiment.SAE):
        def observe(self, fwd):
            calls.append(("observe", torch.is_grad_enabled()))

        def aux_losses(self, fwd):
            calls.append(("aux", torch.is_grad_enabled()))
            return {}

    sae, x = base_sae(cls=Watch), torch.randn(8, 16)
    sae.loss(x, 0)
    assert calls == [("observe", False), ("aux", True)]
    calls.clear()
    sae.eval().loss(x, 0)
    assert calls == [("aux", True)]


def test_training_batch_replaces_input_and_target_in_training_only():
    class FirstHalf(experiment.SAE):
        def training_batch(self, x, step):
            return x[: len(x) // 2], {"kept": len(x) // 2}

    sae, x = base_sae(cls=FirstHalf), torch.randn(8, 16)
    out = sae.loss(x, 0)
    assert out.latents.shape == (4, 64) and out.stats == {"kept": 4}
    torch.testing.assert_close(out.terms["l2_loss"], (x[:4] - sae(x[:4])).pow(2).sum(-1).mean())
    assert sae.eval().loss(x, 0).latents.shape == (8, 64)


def test_the_fused_pre_activation_has_the_formulas_values_and_gradients():
    sae, x = base_sae(), torch.randn(32, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
    plain = sae.pre_activation(x)
    fused = kernels.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    grads = [torch.autograd.grad(pre.pow(2).sum(), (sae.W_enc, sae.b_enc, sae.b_dec)) for pre in (plain, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_a_plugin_that_changes_a_piece_of_the_formula_is_trained_with_it():
    class Doubled(experiment.SAE):
        def activation(self, pre, x):
            return 2 * torch.relu(pre)

    sae, x = base_sae(cls=Doubled), torch.randn(8, 16)
    sae.sparse_backward = True  # never taken: the formula is not the base one
    torch.testing.assert_close(sae.loss(x, 0).latents, 2 * torch.relu(sae.pre_activation(x)))


# ---- the trainer's step is its hooks ---------------------------------------------------------

def test_a_step_calls_the_hooks_in_order_with_the_step_number():
    calls = []

    class Hooked(experiment.Trainer):
        def backward(self, out, step):
            calls.append(("backward", step))
            super().backward(out, step)

        def apply_update(self, step):
            calls.append(("apply_update", step, self.sae.W_dec.grad is not None))
            super().apply_update(step)

        def after_step(self, x, out, step):
            calls.append(("after_step", step))
            out.stats["from_hook"] = 1.0

    sae = base_sae()
    total, out = Hooked(sae, CFG).step(torch.randn(8, 16), 5)
    assert calls == [("backward", 5), ("apply_update", 5, True), ("after_step", 5)]
    assert out.stats["from_hook"] == 1.0 and total == sum(out.terms.values()).detach()


def test_a_step_keeps_decoder_rows_at_unit_norm_and_moves_every_parameter():
    sae = base_sae()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    experiment.Trainer(sae, CFG).step(torch.randn(64, 16) * 3, 0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert all(not torch.equal(before[n], p) for n, p in sae.named_parameters())


# ---- the cache key, plugin loading -----------------------------------------------------------

def test_cache_key_changes_with_what_determines_the_activations_and_nothing_else():
    key = experiment.cache_key(CFG)
    assert experiment.cache_key(dataclasses.replace(CFG, lr=1.0, seed=3, dict_size=8)) == key
    for change in (dict(layer=0), dict(tokens=4096), dict(context_size=16), dict(dataset="x.txt")):
        assert experiment.cache_key(dataclasses.replace(CFG, **change)) != key


def test_a_run_file_defines_only_what_it_changes(scratch_study):
    (scratch_study / "run_1_extra.py").write_text(
        '"""Extra term."""\nfrom plugins.baseline import run_0_baseline as parent\n\n\n'
        'class SAE(parent.SAE):\n    def aux_losses(self, fwd):\n        return {"extra_loss": fwd.f.mean()}\n')
    (scratch_study / "run_2_trainer_only.py").write_text(
        '"""Trainer only."""\nfrom plugins.scratch_test_study import run_1_extra as parent\n\n\n'
        'class Trainer(parent.Trainer):\n    pass\n')
    first, second = experiment.find_plugin("run_1_extra"), experiment.find_plugin("run_2_trainer_only")
    assert first.trainer_class is experiment.Trainer and first.hyperparams_class is experiment.Hyperparams
    assert second.sae_class is first.sae_class and second.parent == "run_1_extra"
    assert second.trainer_class.__mro__[1] is experiment.Trainer


def test_baseline_is_the_harness_sae_and_trainer_plus_only_its_sae_lens_twins():
    plugin = experiment.find_plugin("run_0_baseline")
    assert plugin.sae_class.__bases__ == (experiment.SAE,) and plugin.trainer_class is experiment.Trainer
    assert plugin.hyperparams_class is experiment.Hyperparams
    assert experiment.keeps_methods(plugin.sae_class, experiment.FORMULA, experiment.SAE)
    own = {name for name, value in vars(plugin.sae_class).items() if callable(value)}
    assert own and all(name.startswith("sae_lens_") for name in own), own


def test_training_reads_the_same_batches_as_the_seeded_permutation(tmp_path):
    """The prefetching reader hands the step exactly this rank's rows of the permutation, scaled."""
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline", tokens=40, batch_size=8)
    train = torch.arange(40 * 3, dtype=torch.float32).view(40, 3).numpy()
    data = experiment.ActivationData(train, torch.zeros(1, 4), scale=2.0, from_cache=True)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for rank in (0, 1):
        batches = list(experiment.prefetched_batches(data, order, cfg, range(1, 5), rank, 4,
                                                     torch.device("cpu"), torch.float32))
        assert [step for step, _ in batches] == [1, 2, 3, 4]
        for step, x in batches:
            rows = order[step * 8 + rank * 4: step * 8 + rank * 4 + 4].sort().values
            torch.testing.assert_close(x, torch.from_numpy(train)[rows] * 2.0)


def test_sparse_step_gives_the_dense_step_gradients():
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
    torch.manual_seed(0)
    sae = experiment.SAE(64, 512, experiment.Hyperparams(), cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)  # a few percent of latents fire
        sae.b_dec.normal_()
    x = (torch.randn(300, 64) * 2).requires_grad_()  # the input's gradient too, should anyone need it
    grads = {}
    for sparse in (False, True):
        sae.sparse_backward = sparse
        sae.zero_grad()
        x.grad = None
        out = sae.loss(x, 0)
        sum(out.terms.values()).backward()
        grads[sparse] = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": x.grad.clone()}
    density = (out.latents > 0).float().mean()
    assert 0 < density < 0.05
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b_enc, sparse", [(-5.0, True), (0.0, False)])
def test_trainer_takes_the_sparse_step_on_cpu_only_when_few_latents_fire(b_enc, sparse, monkeypatch):
    # the switch point as if measured on this machine (kernels.sparse_below measures and caches it)
    monkeypatch.setattr(experiment.kernels, "sparse_below", lambda *shapes, **where: 0.10)
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
    torch.manual_seed(0)
    sae = experiment.SAE(64, 512, experiment.Hyperparams(), cfg)
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
    trainer = experiment.Trainer(sae, cfg)
    x = torch.randn(256, 64) * 2
    trainer.step(x, 0)
    assert trainer.sparse is sparse and not sae.sparse_backward  # decided at step 0, taken from step 1
    trainer.step(x, 1)
    assert sae.sparse_backward is sparse


def test_plugin_names_resolve_by_file_name_or_study_path():
    assert experiment.find_plugin("run_7_adaptive_ln").study == "zscore_ortho"
    assert experiment.find_plugin("zscore_ortho/run_7_adaptive_ln").run_number == 7


def test_an_export_says_whether_it_is_the_sae_that_was_evaluated(tmp_path):
    import json

    for key, exact in (("baseline/run_0_baseline", True), ("zscore_ortho/run_7_adaptive_ln", False)):
        plugin = experiment.find_plugin(key)
        sae = plugin.sae_class(16, 64, plugin.hyperparams_class(), CFG)
        folder = tmp_path / plugin.name
        folder.mkdir()
        assert save_sae(sae, 0.5, folder) == {"architecture": "standard", "exact": exact}
        note = json.loads((folder / "cfg.json").read_text())["metadata"]["harness_export"]
        assert (note == "exact") is exact and (exact or "linear part only" in note)


# ---- the layout of the code ------------------------------------------------------------------

MODULES = {p.stem for p in ROOT.glob("*.py")}


def cli_start(tree: ast.Module) -> int:
    """The line where experiment.py's CLI begins (`app = typer.Typer(...)`)."""
    return next(n.lineno for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "app")


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside any function, except in
    the bodies of experiment.py's CLI commands (the entry points may import what is built on the core)."""
    graph = {}
    for module in MODULES:
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        commands = cli_start(tree) if module == "experiment" else math.inf
        graph[module] = imported_modules(tree, commands) & MODULES - {module}
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] where there is none."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for other in sorted(graph[node]):
            if cycle := visit(other):
                return cycle
        path.pop()
        done.add(node)
        return []
    return next((c for c in map(visit, sorted(graph)) if c), [])


def test_imports_run_one_way_except_into_the_cli_command_bodies():
    assert a_cycle(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": set()}) == []


def test_the_core_imports_none_of_what_is_built_on_it():
    built_on_the_core = {"studies", "cluster", "analyses", "plot", "dashboard", "bench", "skeleton"}
    assert not import_graph()["experiment"] & built_on_the_core


def test_no_module_assigns_another_modules_globals():
    found = [f"{module}.py:{node.lineno}" for module in sorted(MODULES)
             for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text()))
             if isinstance(node, (ast.Assign, ast.AugAssign))
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) in MODULES]
    assert found == []


def python_files():
    return [ROOT / f"{m}.py" for m in sorted(MODULES)] + sorted((ROOT / "plugins").glob("*/run_*.py"))


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_function_fits_on_a_screen(path):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").glob("*/run_*.py")), ids=lambda p: p.stem)
def test_plugins_override_hooks_not_the_loss_the_encoder_or_the_step(path):
    tree = ast.parse(path.read_text())
    defined = {(c.name, f.name) for c in tree.body if isinstance(c, ast.ClassDef)
               for f in c.body if isinstance(f, ast.FunctionDef)}
    assert not defined & {("SAE", "loss"), ("SAE", "encode"), ("SAE", "training_pass"), ("Trainer", "step")}
    assert not squared_errors_of_x_hat(tree)  # the reconstruction loss is the base class's


def squared_errors_of_x_hat(tree: ast.Module) -> list[int]:
    """The lines that square a difference with x_hat, `(x - x_hat).pow(2)` or `(x_hat - x) ** 2`."""
    def squared(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "pow":
            return node.func.value
        return node.left if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) else None
    return [node.lineno for node in ast.walk(tree) if isinstance(base := squared(node), ast.BinOp)
            and isinstance(base.op, ast.Sub) and "x_hat" in {getattr(side, "attr", getattr(side, "id", None))
                                                            for side in (base.left, base.right)}]


def test_the_x_hat_check_finds_a_squared_reconstruction_error():
    assert squared_errors_of_x_hat(ast.parse("a = (fwd.x - fwd.x_hat).pow(2)\nb = (x_hat - x) ** 2\nc = x.pow(2)"))\
        == [1, 2]


def test_a_newcomer_meets_the_sae_and_the_trainer_first_in_a_file_of_its_core():
    tree = ast.parse((ROOT / "experiment.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["SAE"].lineno < 300 and classes["Trainer"].end_lineno <= 450
    assert tree.body[-1].end_lineno <= 1225  # ≈ 1,200 (issue 24)
