"""What several test modules share: running the tiny preset, the CLI in-process, reading a run's
log and real tiny-model activations, comparisons of tensors and states, the imports of a source
file; the sparse step against the dense one (test_kernels, test_gpu_check); a word-level
tokenizer and stand-ins for sae_bench's hub datasets (test_evals, test_analyses); the baselines'
SAELens parity pieces (test_baseline_*). Fixtures live in conftest.py; this module holds plain
functions and constants only, and no test module imports from another."""

import ast
import contextlib
import copy
import functools
import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

import evals
import experiment
import sources
from runs import save_sae

ROOT = Path(experiment.__file__).resolve().parent
TOPK_FAMILY = ["baseline/run_0_topk", "baseline/run_0_batchtopk", "baseline/run_0_matryoshka"]

# A word-level vocabulary for the tiny model (which has no tokenizer of its own) and text in it, for
# the evaluations that need words: 5 single-token words per letter.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = [c + end for c in LETTERS for end in ("ab", "ot", "ine", "ery", "ulk")]
SPECIAL = ["<bos>", "<pad>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
VOCAB = (SPECIAL + list(LETTERS.upper() + LETTERS) + list("0123456789:.,()") + WORDS
         + ["has", "the", "first", "letter", "user", "model", "Answer"])
AMAZON_CATEGORIES = [1, 2, 3, 5, 6, 11, 18, 24, 26, 30]  # sparse probing's classes and SCR's pairs


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


HOLD_CLAIM = """import sys, time
from pathlib import Path
from runs import claimed
with claimed(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def ctrl_c_raises():
    """Python's Ctrl-C handler (KeyboardInterrupt) for the block, as in a terminal: a suite started
    as a shell's background job (`cmd &`) has SIGINT ignored, and Python keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def claimed_by_another_process(run_dir: Path):
    """run_dir claimed (runs.claimed) by a child process, as one training there holds it, until the
    child is killed (at the block's end at the latest): yields the child."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


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
    """An SAE of TOPK_FAMILY away from its initial biases, n_dead latents past the dead window."""
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


def word_level_tokenizer(folder: Path):
    """A Hugging Face tokenizer of VOCAB, one token per word, BOS first, saved in `folder` and
    loaded back from it (TransformerLens needs one loaded from a folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert len(VOCAB) <= sources.TINY_MODEL["d_vocab"] and VOCAB[sources.TINY_BOS] == "<bos>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>", additional_special_tokens=SPECIAL[4:]).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def text(rng: random.Random, n_words: int = 12) -> str:
    return " ".join(rng.choices(WORDS, k=n_words))


def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    """Small stand-ins, in the columns sae_bench reads, for every hub dataset its evals load."""
    import datasets
    from sae_bench.sae_bench_utils import dataset_info

    rng = random.Random(f"{path}/{name}/{split}")
    professions = sorted({int(c) for name_, classes in dataset_info.chosen_classes_per_dataset.items()
                          if "bias_in_bios" in name_ for c in classes})

    def both_splits(make_rows):
        return datasets.DatasetDict({s: datasets.Dataset.from_list(make_rows()) for s in ("train", "test")})

    if path == "LabHC/bias_in_bios":
        return both_splits(lambda: [dict(hard_text=text(rng), profession=p, gender=g)
                                    for p in professions for g in (0, 1) for _ in range(24)])
    if path == "canrager/amazon_reviews_mcauley_1and5":
        return both_splits(lambda: [dict(text=text(rng), category=c, rating=r)
                                    for c in AMAZON_CATEGORIES for r in (1.0, 5.0) for _ in range(24)])
    if path == "fancyzhx/ag_news":
        return both_splits(lambda: [dict(text=text(rng), label=c) for c in range(4) for _ in range(24)])
    if path == "Helsinki-NLP/europarl" and streaming:
        return [{"translation": {lang: text(rng) for lang in name.split("-")}} for _ in range(40)]
    if path == "codeparrot/github-code" and streaming:
        return [dict(language=lang, code=text(rng, 120)) for _ in range(40) for lang in kwargs["languages"]]
    if path == "wikitext" and split == "test":
        return datasets.Dataset.from_list([dict(text=text(rng, 30)) for _ in range(40)])
    if path in ("cais/wmdp", "cais/mmlu") and split == "test":
        return datasets.Dataset.from_list([dict(question=text(rng, 8), choices=rng.sample(WORDS, 4),
                                                answer=rng.randrange(4)) for _ in range(6)])
    raise FileNotFoundError(f"no fixture for {path} {name} {split}")


# ---- SAELens parity of the baselines (tests/test_baseline_*.py) ---------------------------------

PARITY_D_IN, PARITY_D_SAE = 64, 256  # the parity tests' SAE
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def trained_sae(key: str, acts: torch.Tensor, d_sae: int, steps: int = 20, rows: int | None = None):
    """The plugin's SAE (seed 0) trained `steps` steps by its trainer on real activations at the
    harness's training scale, each step on the next `rows` rows (or all of them): (sae, scale)."""
    scale = sources.activation_scale(acts.numpy())
    plugin, cfg = experiment.find_plugin(key), experiment.build_config("tiny", key)
    torch.manual_seed(0)
    sae = plugin.sae_class(acts.shape[1], d_sae, plugin.hyperparams_class(), cfg)
    trainer = plugin.trainer_class(sae, cfg)
    for step in range(steps):
        trainer.step((acts if rows is None else acts[rows * step:rows * (step + 1)]) * scale, step)
    return sae, scale


def exported(sae, scale: float, folder: Path, architecture: str):
    """Save `sae` as a run does, as an exact export of `architecture`, and load it with SAELens."""
    from sae_lens import SAE as SAELensSAE

    assert save_sae(sae, scale, folder) == {"architecture": architecture, "exact": True}
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["harness_export"] == "exact"
    return SAELensSAE.load_from_disk(folder)


def assert_export_is_the_evaluated_sae(loaded, sae, scale: float, acts: torch.Tensor,
                                       close=assert_close_in_norm) -> torch.Tensor:
    """The SAELens export encodes, decodes and reconstructs the model's activations as the SAE
    that was evaluated (evals.ScaledSAE) does, each to `close(ours, theirs, what)`; returns the
    evaluated SAE's latents."""
    ours = evals.ScaledSAE(sae.eval(), scale)
    with torch.no_grad():
        f = ours.encode(acts)
        assert 0 < (f > 0).float().mean() < 1
        close(loaded.encode(acts), f, "exported encode")
        close(loaded.decode(f), ours.decode(f), "exported decode")
        close(loaded(acts), ours(acts), "exported forward")
    return f


# The BatchTopK family (BatchTopK and Matryoshka): its SAE, SAELens's twin of it and a training pass
# of the twin, for test_baseline_batchtopk.py (the family's checks; its docstring gives the setting)
# and test_baseline_matryoshka.py (the prefixes).

def make_sae(key, seed=0, never_firing=8, **hp):
    """The plugin's SAE away from its initial weights (decoder rows on the unit sphere, as the
    harness keeps them); the last `never_firing` latents get a bias that keeps them off, so that
    they go dead after dead_steps steps."""
    plugin = experiment.find_plugin(key)
    torch.manual_seed(seed)
    cfg = experiment.build_config("tiny", key)
    sae = plugin.sae_class(PARITY_D_IN, PARITY_D_SAE, plugin.hyperparams_class(**hp), cfg)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.T + 0.05 * torch.randn(PARITY_D_IN, PARITY_D_SAE))
        sae.b_enc.copy_(0.3 * torch.randn(PARITY_D_SAE))
        sae.b_dec.copy_(0.3 * torch.randn(PARITY_D_IN))
        sae.b_enc[PARITY_D_SAE - never_firing:] = -30.0  # ten standard deviations of pre below 0
    return sae


def sae_lens_twin(sae, rescale: bool):
    """SAELens's training SAE of the plugin's kind holding our weights and θ, built here (not by
    the plugin's hook)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    hp = sae.hp
    common = dict(d_in=PARITY_D_IN, d_sae=PARITY_D_SAE, k=hp.k, topk_threshold_lr=hp.topk_threshold_lr,
                  dtype="float32", device="cpu", aux_loss_coefficient=hp.aux_loss_coefficient,
                  rescale_acts_by_decoder_norm=rescale)
    if hasattr(hp, "prefix_fractions"):
        widths = [round(f * PARITY_D_SAE) for f in hp.prefix_fractions]
        ref = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=widths))
    else:
        ref = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    with torch.no_grad():
        for name in PARAMS:
            getattr(ref, name).copy_(getattr(sae, name))
        ref.topk_threshold.copy_(sae.topk_threshold)
    return ref


def batch(seed, n=256):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, PARITY_D_IN, generator=gen) * 3 + 1


def sae_lens_pass(ref, x, step, dead):
    from sae_lens.saes.sae import TrainStepInput

    return ref.train().training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False))


def tiny_model_with_tokenizer():
    """The tiny model with a character-level tokenizer, for the paths that read text."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    class CharTokenizer:
        bos_token_id, eos_token_id, pad_token_id, padding_side = 0, 1, 2, "right"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 500) for c in text]}
    model = HookedTransformer(HookedTransformerConfig(**sources.TINY_MODEL, seed=0))
    model.tokenizer = CharTokenizer()
    return model
