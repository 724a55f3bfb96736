"""What a person looks at besides the metrics: a feature dashboard page per run, and the training
curves in wandb.

    python experiment.py dashboard RUN_DIR --latents 0-49      # writes RUN_DIR/dashboard/index.html
    python experiment.py run --plugin ... --wandb              # WandbRun, below

The page is one self-contained HTML file (inline CSS, JS and SVG; it opens from disk with no
network). Per latent, as SAE-Vis shows it: its top activating contexts (one per context, ranked by
the context's peak), each token shaded by the activation and the peak token marked; contexts drawn
from each quarter of its firing activations; a histogram of its activations and its firing
frequency; the output tokens its decoder direction raises and lowers most; the plugin's per-latent
artifacts. At the top, an index sortable by density and max activation, and the latents that never
fired on the text, counted and listed.

The held-out text streams through the model (stopped at the hooked layer) and the SAE's own
`encode` (so thresholds and custom encoders are the SAE's) in batches of contexts, with a progress
bar; what is kept is bounded by tracked latents x (top contexts + samples) x window, not by the text.
"""

from __future__ import annotations

from common import HarnessError, console  # first: its import guards

import dataclasses
import html
import math
import netrc
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import experiment
import kernels
import synthetic

DEFAULT_LATENTS = 50  # the top N by density, when neither --latents nor --top is given
DEFAULT_TOKENS = 16_384  # where the run's text allows more than its eval contexts: 4x the embedded eval text
TOP_CONTEXTS = 10  # per latent
SAMPLES = 64  # a uniform sample of each latent's firing tokens, for the quantile rows
BANDS, SHOWN_PER_BAND = 4, 3  # quarters of the firing activations, and contexts shown from each
BEFORE, AFTER = 20, 6  # tokens shown around the marked token
OFFSETS = torch.arange(-BEFORE, AFTER + 1)
HIST_RANGE, HIST_BINS = (-3.0, 3.0), 36  # log10 activation; values outside land in the end bins
TOP_LOGITS = 10
LATENT_CHUNK = 1024  # tracked latents updated at once: bounds the per-batch working memory


# ----------------------------------------------------------------------------------------------
# Which latents, and which text.

@dataclass
class Selection:
    """Which latents get a section: explicit ids, or the top N by density or max activation."""

    ids: list[int] | None = None
    top: int = DEFAULT_LATENTS
    by: str = "density"


def selection(latents: str | None, top: int | None, by: str, d_sae: int) -> Selection:
    """The --latents / --top / --by flags, checked before any work."""
    if latents and top is not None:
        raise HarnessError("--latents and --top both choose latents; give one")
    if by not in ("density", "activation"):
        raise HarnessError(f"--by {by}: use density or activation")
    if top is not None and top <= 0:
        raise HarnessError(f"--top must be positive, got {top}")
    if latents:
        return Selection(ids=parse_latents(latents, d_sae))
    return Selection(top=min(top or DEFAULT_LATENTS, d_sae), by=by)


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """'0-49' or '3,17,100-120' (ranges inclusive) -> sorted distinct ids, each below d_sae."""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise HarnessError(f"--latents {spec}: '{part}' is not an id or a range like 0-49") from None
        if not 0 <= low <= high < d_sae:
            raise HarnessError(f"--latents {spec}: '{part}' is outside the SAE's latents 0-{d_sae - 1}")
        ids.update(range(low, high + 1))
    if not ids:
        raise HarnessError(f"--latents {spec!r} names no latent; e.g. --latents 0-49")
    return sorted(ids)


def held_out_contexts(eval_tokens: torch.Tensor, n_tokens: int | None, cfg, load_tokens) -> tuple[torch.Tensor, str]:
    """Contexts of text the SAE never trained on, holding n_tokens tokens (context_size - 1 per
    context; default DEFAULT_TOKENS where the text allows, else the eval contexts): the run's eval
    contexts, then, where those come from the training documents, the text after the training text.
    load_tokens(cfg) -> (train, eval) packs eval then training contexts from one document stream,
    so asking it for more training tokens gives the same contexts followed by text training never
    read. Returns the contexts and a phrase saying what they are."""
    per_context = eval_tokens.shape[1] - 1
    more_text = cfg.dataset != "synthetic" and cfg.eval_dataset is None
    if n_tokens is not None and n_tokens <= 0:
        raise HarnessError(f"--tokens must be positive, got {n_tokens}")
    need = math.ceil((n_tokens or (DEFAULT_TOKENS if more_text else eval_tokens[:, 1:].numel())) / per_context)
    if need <= len(eval_tokens):
        return eval_tokens[:need], f"{need} of the run's held-out evaluation contexts"
    if not more_text:
        raise HarnessError(f"--tokens {n_tokens}: this run's held-out text is its {len(eval_tokens)} evaluation "
                           f"contexts ({len(eval_tokens) * per_context} tokens; its training text is "
                           f"{'synthetic' if cfg.dataset == 'synthetic' else 'another dataset'}); ask for at most that")
    extra = need - len(eval_tokens)
    console.print(f"dashboard: finding the text after the run's training text ({cfg.dataset}: tokenising it again)...")
    trained, _ = load_tokens(cfg)
    longer, eval_again = load_tokens(dataclasses.replace(cfg, tokens=cfg.tokens + extra * per_context))
    if not torch.equal(eval_again, eval_tokens):
        raise HarnessError(f"dataset {cfg.dataset} no longer gives this run's evaluation contexts, so the text after "
                           f"its training text cannot be found; use --tokens {len(eval_tokens) * per_context} or less")
    after = longer[len(trained):len(trained) + extra]
    return torch.cat([eval_tokens, after]), (f"the run's {len(eval_tokens)} held-out evaluation contexts and "
                                             f"{extra} contexts of the text after its training text")


# ----------------------------------------------------------------------------------------------
# Streaming: every latent's counts, and kept examples of the tracked latents.

@dataclass
class Examples:
    """Up to k kept tokens per tracked latent, ranked by `key` (the largest kept): each token's
    context and position, its activation, and the latent's activations on the window
    position-BEFORE .. position+AFTER. Shapes (M, k), window (M, k, BEFORE + 1 + AFTER)."""

    key: torch.Tensor
    value: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor
    window: torch.Tensor

    @classmethod
    def empty(cls, m: int, k: int) -> Examples:
        return cls(torch.full((m, k), -math.inf), torch.zeros(m, k), torch.zeros(m, k, dtype=torch.long),
                   torch.zeros(m, k, dtype=torch.long), torch.zeros(m, k, len(OFFSETS)))

    def merge(self, first: int, new: Examples) -> None:
        """For tracked latents first.., keep the k largest keys among the kept and the new examples."""
        last, k = first + len(new.key), self.key.shape[1]
        joined = {f.name: torch.cat([getattr(self, f.name)[first:last], getattr(new, f.name)], 1)
                  for f in dataclasses.fields(self)}
        order = joined["key"].topk(k, dim=1).indices
        for name, values in joined.items():
            index = order if values.dim() == 2 else order[..., None].expand(-1, -1, values.shape[2])
            getattr(self, name)[first:last] = values.gather(1, index)


def windows_around(g: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """g (B, T, M) activations; rows, positions (M, C) -> (M, C, W) each latent's activations
    around each token, zero beyond the context's ends."""
    at = positions[..., None] + OFFSETS
    inside = (at >= 0) & (at < g.shape[1])
    latent = torch.arange(g.shape[2])[:, None, None]
    return g[rows[..., None], at.clamp(0, g.shape[1] - 1), latent] * inside


def context_peaks(g: torch.Tensor, first_context: int) -> Examples:
    """Each context's peak token per latent, keyed by the peak (-inf where the latent is silent)."""
    peak, position = g.max(dim=1)  # (B, M)
    rows = torch.arange(g.shape[0]).expand(g.shape[2], -1)
    value, position = peak.T, position.T
    return Examples(value.masked_fill(value <= 0, -math.inf), value, rows + first_context, position,
                    windows_around(g, rows, position))


def firing_sample(g: torch.Tensor, first_context: int, k: int, generator: torch.Generator) -> Examples:
    """Up to k firing tokens per latent under uniform random keys (-inf where silent): keeping the
    k largest keys over the whole stream is a uniform sample without replacement."""
    b, t, m = g.shape
    keys = torch.rand(g.shape, generator=generator).masked_fill(g <= 0, -math.inf).view(b * t, m)
    key, flat = keys.topk(min(k, b * t), dim=0)
    rows, position = (flat // t).T, (flat % t).T
    value = g[rows, position, torch.arange(m)[:, None]]
    return Examples(key.T, value, rows + first_context, position, windows_around(g, rows, position))


class LatentStats:
    """Running statistics over the streamed tokens: every latent's firing count, max and sum; for
    the tracked latents an activation histogram, the top contexts and a sample of firing tokens."""

    def __init__(self, d_sae: int, tracked: torch.Tensor, seed: int = 0):
        self.tracked, self.tokens = tracked, 0
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.max = torch.zeros(d_sae)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.histogram = torch.zeros(len(tracked), HIST_BINS, dtype=torch.long)
        self.top, self.samples = Examples.empty(len(tracked), TOP_CONTEXTS), Examples.empty(len(tracked), SAMPLES)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, f: torch.Tensor, first_context: int, tokens: int) -> None:
        """f (B, T, d_sae): a batch of contexts' latents, zero at the BOS positions it does not count."""
        self.tokens += tokens
        flat = f.flatten(0, 1)
        self.fired += (flat > 0).sum(0)
        self.max = torch.maximum(self.max, flat.amax(0))
        self.total += flat.sum(0, dtype=torch.float64)
        for first in range(0, len(self.tracked), LATENT_CHUNK):
            g = f[..., self.tracked[first:first + LATENT_CHUNK]]
            self.add_histogram(g, first)
            self.top.merge(first, context_peaks(g, first_context))
            self.samples.merge(first, firing_sample(g, first_context, SAMPLES, self.generator))

    def add_histogram(self, g: torch.Tensor, first: int) -> None:
        fired = g > 0
        latent = fired.nonzero()[:, 2] + first  # row-major, as g[fired] is
        low, high = HIST_RANGE
        bins = ((g[fired].log10() - low) / (high - low) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        self.histogram.view(-1).index_add_(0, latent * HIST_BINS + bins, torch.ones_like(bins))

    def density(self) -> torch.Tensor:
        return self.fired / max(self.tokens, 1)

    def mean_when_firing(self) -> torch.Tensor:
        return (self.total / self.fired.clamp(min=1)).float()


@torch.no_grad()
def stream(sae, model, contexts: torch.Tensor, cfg, tracked: torch.Tensor) -> LatentStats:
    """Run contexts (n, T) through the model up to cfg.hook_name and the SAE's encode, cfg.llm_batch_size
    contexts at a time; BOS positions (each context's first token and document separators, as in
    the harvest) are neither encoded nor counted."""
    stats, bos = LatentStats(cfg.dict_size, tracked), contexts[0, 0].item()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} contexts"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("dashboard: stream held-out text", total=len(contexts))
        for first in range(0, len(contexts), cfg.llm_batch_size):
            batch = contexts[first:first + cfg.llm_batch_size]
            _, cache = model.run_with_cache(batch.to(model.cfg.device), names_filter=[cfg.hook_name],
                                            stop_at_layer=cfg.layer + 1)
            counted = batch != bos
            f = torch.zeros(*batch.shape, cfg.dict_size)
            f[counted] = sae.encode(cache[cfg.hook_name][counted.to(model.cfg.device)]).float().cpu()
            stats.add(f, first, int(counted.sum()))
            progress.update(task, advance=len(batch))
    return stats


def chosen_latents(stats: LatentStats, chosen: Selection) -> list[int]:
    if chosen.ids is not None:
        return chosen.ids
    score = stats.density() if chosen.by == "density" else stats.max
    return score.topk(chosen.top).indices.tolist()


@torch.no_grad()
def logit_effects(sae, model, latents: list[int], d_sae: int, k: int = TOP_LOGITS):
    """Per latent, the k output tokens its decoder direction raises and lowers most: (d_i * g) W_U,
    with d_i = decode(e_i) - decode(0), the latent's direction as the SAE's own decode gives it,
    and g the final norm's gain (1 where the model has none). Returns (raised, lowered), each a
    pair of (len(latents), k) tensors: logit change per unit activation, token ids."""
    gain = getattr(getattr(model, "ln_final", None), "w", None)
    tops = []
    for first in range(0, len(latents), 64):  # (64, d_vocab) at a time: Gemma's vocabulary is 262k
        ids = torch.tensor(latents[first:first + 64])
        one_hot = torch.zeros(len(ids), d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        one_hot[torch.arange(len(ids)), ids] = 1
        directions = sae.decode(one_hot) - sae.decode(torch.zeros_like(one_hot))
        if gain is not None:
            directions = directions * gain
        logits = (directions.to(model.W_U.dtype) @ model.W_U).float()
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        tops.append((up.values, up.indices, down.values, down.indices))
    up_values, up_ids, down_values, down_ids = (torch.cat(parts).cpu() for parts in zip(*tops))
    return (up_values, up_ids), (down_values, down_ids)


def per_latent_artifacts(run_dir: Path, d_sae: int) -> dict[str, torch.Tensor]:
    """The plugin's artifacts with one entry per latent. A permutation of the latents (an order,
    such as freq_order's frequency_order) becomes each latent's rank in it."""
    path = run_dir / "artifacts.safetensors"
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    found = {}
    for name, values in load_file(path).items():
        if values.dim() == 0 or values.shape[0] != d_sae:
            continue
        order = values.dim() == 1 and not values.is_floating_point()
        if order and torch.equal(values.sort().values, torch.arange(d_sae)):
            rank = torch.empty_like(values)
            rank[values] = torch.arange(d_sae)
            found[f"rank in {name}"] = rank
        else:
            found[name] = values
    return found


# ----------------------------------------------------------------------------------------------
# The page.

class TokenText:
    """Token ids as text: the tokenizer's string for each id (newlines and tabs made visible), or
    #id where the model has no tokenizer (the tiny preset)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.known:
            text = f"#{token} " if self.tokenizer is None else self.tokenizer.decode([token])
            self.known[token] = text.replace("\n", "↵").replace("\t", "⇥")
        return self.known[token]


@dataclass
class Page:
    """What the latent sections are drawn from."""

    stats: LatentStats
    contexts: torch.Tensor
    text: TokenText
    raised: tuple[torch.Tensor, torch.Tensor]
    lowered: tuple[torch.Tensor, torch.Tensor]
    artifacts: dict[str, torch.Tensor]


def context_html(page: Page, examples: Examples, row: int, j: int, peak: float) -> str:
    """One kept example as a line of tokens: each shaded by activation / peak, the token itself marked."""
    context, position = int(examples.context[row, j]), int(examples.position[row, j])
    first, stop = max(0, position - BEFORE), min(page.contexts.shape[1], position + AFTER + 1)
    spans = []
    for at in range(first, stop):
        act = float(examples.window[row, j, at - position + BEFORE])
        shade = f' style="--a:{min(act / peak, 1):.2f}" title="{act:.3g}"' if act > 0 else ""
        mark = ' class="m"' if at == position else ""
        spans.append(f"<span{mark}{shade}>{html.escape(page.text(int(page.contexts[context, at])))}</span>")
    return f'<li><b>{float(examples.value[row, j]):.3g}</b><code class="ctx">{"".join(spans)}</code></li>'


def quantile_rows(page: Page, row: int, peak: float) -> str:
    """Contexts drawn from each quarter (by rank) of the latent's sampled firing activations."""
    samples = page.stats.samples
    order = [j for j in samples.value[row].argsort().tolist() if samples.value[row, j] > 0]
    bands = []
    for band in range(BANDS):
        members = order[band * len(order) // BANDS:(band + 1) * len(order) // BANDS]
        if not members:
            continue
        shown = members[::max(1, len(members) // SHOWN_PER_BAND)][:SHOWN_PER_BAND]
        low, high = float(samples.value[row, members[0]]), float(samples.value[row, members[-1]])
        items = "".join(context_html(page, samples, row, j, peak) for j in shown)
        bands.append(f"<h4>quantile {100 * band // BANDS}–{100 * (band + 1) // BANDS}% of its firing "
                     f"activations ({low:.3g}–{high:.3g})</h4><ol>{items}</ol>")
    return "".join(bands)


def histogram_svg(counts: list[int], low: float, high: float, label: str) -> str:
    """Bars over log10 bins from low to high, the axis labelled in powers of ten."""
    width, height, most = 320, 64, max(max(counts), 1)
    step = width / len(counts)
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - height * c / most:.1f}" width="{step - 1:.1f}" '
                   f'height="{height * c / most:.1f}"><title>{c}</title></rect>' for i, c in enumerate(counts) if c)
    ticks = "".join(f'<text x="{width * (e - low) / (high - low):.0f}" y="{height + 12}">1e{e:g}</text>'
                    for e in range(math.ceil(low), math.floor(high) + 1))
    return (f'<figure><svg class="hist" viewBox="-12 0 {width + 24} {height + 16}" width="{width + 24}" '
            f'height="{height + 16}">{bars}{ticks}</svg><figcaption>{label}</figcaption></figure>')


def logits_table(page: Page, i: int) -> str:
    rows = "".join(f"<tr><td>{html.escape(page.text(int(up_id)))}</td><td>{up:+.3g}</td>"
                   f"<td>{html.escape(page.text(int(down_id)))}</td><td>{down:+.3g}</td></tr>"
                   for up, up_id, down, down_id in zip(page.raised[0][i].tolist(), page.raised[1][i],
                                                       page.lowered[0][i].tolist(), page.lowered[1][i]))
    return f'<table class="logits"><tr><th colspan=2>promoted</th><th colspan=2>suppressed</th></tr>{rows}</table>'


def artifacts_table(page: Page, latent: int) -> str:
    if not page.artifacts:
        return ""
    shown = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>"
                   f"{', '.join(shown(v) for v in torch.atleast_1d(values[latent]).flatten()[:8].tolist())}</td></tr>"
                   for name, values in page.artifacts.items())
    return f'<table class="artifacts"><caption>plugin artifacts</caption>{rows}</table>'


def latent_section(page: Page, i: int, latent: int, row: int) -> str:
    """Latent `latent`: i-th on the page, row-th of the tracked latents."""
    stats = page.stats
    peak, fired = float(stats.max[latent]), int(stats.fired[latent])
    head = (f'<section class="latent" id="l{latent}"><h2>Latent {latent}</h2><p>density '
            f'{float(stats.density()[latent]):.3%} ({fired:,} of {stats.tokens:,} tokens) · max activation '
            f'{peak:.3g} · mean when firing {float(stats.mean_when_firing()[latent]):.3g}</p>')
    if fired == 0:
        return head + "<p>It never fired on this text.</p></section>"
    low, high = HIST_RANGE
    hist = histogram_svg(stats.histogram[row].tolist(), low, high, "activations when firing (log scale)")
    tops = "".join(context_html(page, stats.top, row, j, peak)
                   for j in range(TOP_CONTEXTS) if stats.top.value[row, j] > 0)
    return (f'{head}<div class="row">{hist}{logits_table(page, i)}{artifacts_table(page, latent)}</div>'
            f'<h3>Top activations</h3><ol>{tops}</ol>{quantile_rows(page, row, peak)}</section>')


STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em auto;max-width:1150px;color:#222}
h2{margin:.2em 0;border-top:2px solid #ccc;padding-top:.6em}h3,h4{margin:.6em 0 .2em}h4{font-weight:normal;color:#555}
.row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
ol{margin:0;padding-left:2.5em}li{white-space:nowrap;overflow-x:auto}li b{display:inline-block;width:4.5em;font-weight:normal;color:#777}
.ctx{white-space:pre;font-size:12.5px}.ctx span[style]{background:rgba(255,110,0,var(--a))}
.ctx .m{outline:1.5px solid #b00;font-weight:bold}
.hist rect{fill:#5a7fb0}.hist text{font-size:10px;text-anchor:middle;fill:#555}figure{margin:0}
figcaption{font-size:12px;color:#555}table{border-collapse:collapse;font-size:13px}
td,th{padding:1px 8px;text-align:left}.logits td:nth-child(2n){color:#777}
#index th{background:#eee}#index th[data-sort]{cursor:pointer}#index th[data-sort]::after{content:" ⇅";color:#999}
#index{max-height:24em;overflow:auto;display:block}details{margin:.5em 0}
"""

# Sorts the index by a column on a click (again: the other way); ?by=density|activation|mean|latent
# chooses the first sort. data-ready marks a page whose script ran to the end.
SCRIPT = """
const table = document.getElementById("index"), heads = [...table.tHead.rows[0].cells];
function sortBy(key, descending) {
  const col = heads.findIndex(th => th.dataset.sort === key), body = table.tBodies[0];
  const rows = [...body.rows].sort((a, b) => parseFloat(a.cells[col].dataset.v) - parseFloat(b.cells[col].dataset.v));
  body.append(...(descending ? rows.reverse() : rows));
  table.dataset.sorted = key + (descending ? " desc" : " asc");
}
heads.filter(th => th.dataset.sort).forEach(th => th.addEventListener("click",
  () => sortBy(th.dataset.sort, table.dataset.sorted !== th.dataset.sort + " desc")));
sortBy(new URLSearchParams(location.search).get("by") || "density", true);
document.body.dataset.ready = "yes";
"""


def id_ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1–3, 7'."""
    parts, start = [], None
    for k, i in enumerate(ids):
        start = i if start is None else start
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}–{i}")
            start = None
    return ", ".join(parts)


def index_html(page: Page, latents: list[int]) -> str:
    """The sortable index of the shown latents, every latent's density histogram, and the dead ones."""
    stats = page.stats
    density, mean = stats.density(), stats.mean_when_firing()
    rows = "".join(f'<tr><td data-v="{i}"><a href="#l{i}">{i}</a></td><td data-v="{float(density[i]):.6g}">'
                   f'{float(density[i]):.3%}</td><td data-v="{float(stats.max[i]):.6g}">{float(stats.max[i]):.3g}</td>'
                   f'<td data-v="{float(mean[i]):.6g}">{float(mean[i]):.3g}</td><td>'
                   f'{html.escape(page.text(int(page.raised[1][n, 0])))}</td></tr>' for n, i in enumerate(latents))
    dead = (stats.fired == 0).nonzero().flatten().tolist()
    low = math.floor(math.log10(1 / max(stats.tokens, 1)))
    live = density[density > 0].log10()
    counts = torch.histc(live, bins=30, min=low, max=0).long().tolist() if len(live) else [0] * 30
    return (f'<div class="row"><table id="index"><thead><tr><th data-sort="latent">latent</th>'
            f'<th data-sort="density">density</th><th data-sort="activation">max activation</th>'
            f'<th data-sort="mean">mean when firing</th><th>top promoted token</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>'
            f'{histogram_svg(counts, low, 0, f"firing frequency of the {len(stats.fired) - len(dead):,} latents that fired")}'
            f'</div><details><summary>{len(dead):,} of {len(stats.fired):,} latents ({len(dead) / len(stats.fired):.1%}) '
            f'never fired on this text</summary><p>{id_ranges(dead) or "none"}</p></details>')


def page_html(title: str, about: str, page: Page, latents: list[int]) -> str:
    rows = {int(latent): row for row, latent in enumerate(page.stats.tracked.tolist())}
    silent_last = sorted(range(len(latents)), key=lambda i: int(page.stats.fired[latents[i]]) == 0)
    sections = "".join(latent_section(page, i, latents[i], rows[latents[i]]) for i in silent_last)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(about)}</p>'
            f'{index_html(page, latents)}{sections}<script>{SCRIPT}</script></body></html>')


def for_run(run_dir: Path, latents: str | None, top: int | None, by: str, tokens: int | None, device: str) -> Path:
    """`python experiment.py dashboard RUN_DIR`: the page of a finished run, every input checked first."""
    cfg, plugin = experiment.saved_config(run_dir, "dashboard")
    if synthetic.is_synthetic(cfg):
        raise HarnessError(f"{run_dir} was trained on the synthetic preset {cfg.preset}: a dashboard shows latents on "
                           "a language model's text; its ground-truth scores are in its final_info.json")
    chosen = selection(latents, top, by, cfg.dict_size)
    if tokens is not None and tokens <= 0:
        raise HarnessError(f"--tokens must be positive, got {tokens}")
    torch_device = kernels.resolve_device(device)
    sae = experiment.saved_sae(run_dir, cfg, plugin, torch_device)  # before the model: a run without weights stops here
    model = experiment.load_model(cfg.model, torch_device)
    contexts, source = held_out_contexts(torch.load(run_dir / "eval_tokens.pt"), tokens, cfg,
                                         lambda c: experiment.load_tokens(c, model))
    return write_dashboard(run_dir, sae, model, cfg, contexts, source, chosen)


def write_dashboard(run_dir: Path, sae, model, cfg, contexts: torch.Tensor, text_source: str,
                    chosen: Selection) -> Path:
    """Stream the contexts through the model and the SAE, write RUN_DIR/dashboard/index.html and
    return its path. sae: the run's evaluated SAE (encode, decode, W_dec); model: a
    HookedTransformer; cfg: the run's RunConfig."""
    tracked = torch.tensor(chosen.ids) if chosen.ids is not None else torch.arange(cfg.dict_size)
    stats = stream(sae, model, contexts, cfg, tracked)
    latents = chosen_latents(stats, chosen)
    raised, lowered = logit_effects(sae, model, latents, cfg.dict_size)
    page = Page(stats, contexts, TokenText(model.tokenizer), raised, lowered, per_latent_artifacts(run_dir, cfg.dict_size))
    how = f"latents {id_ranges(latents)}" if chosen.ids is not None else f"the top {len(latents)} latents by {chosen.by}"
    about = (f"{cfg.plugin}, {run_dir.name}: {cfg.model} {cfg.hook_name}, {cfg.dict_size:,} latents; {how}, on "
             f"{stats.tokens:,} tokens of held-out text ({text_source}). Promoted and suppressed tokens: the "
             f"decoder direction times the final norm's gain through the unembedding, per unit activation and "
             f"before the norm divides by the residual's scale: compare them within a latent.")
    out = run_dir / "dashboard" / "index.html"
    out.parent.mkdir(exist_ok=True)
    out.write_text(page_html(f"Feature dashboard: {cfg.plugin}", about, page, latents), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------
# wandb: `run --wandb`.

class WandbRun:
    """A wandb run beside a harness run: the config at the start, every train_log row as it is
    written (StepLog calls log_row through `sinks`), the final metrics in its summary. Offline
    (`wandb sync DIR` uploads it later) without an API key or when the server does not answer.
    Any wandb failure is one warning and ends the logging, never the run. Inactive when project is
    None, and on every process but the leader under torchrun."""

    def __init__(self, project: str | None, config: dict, name: str, sinks: list):
        self.run, self.sinks = None, sinks
        if project is None or int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            import wandb

            mode, why = wandb_mode()
            asked = os.environ.get("WANDB_DIR")  # read here: wandb reads it once per process
            self.run = wandb.init(project=project, name=name, config=config, mode=mode, dir=asked,
                                  settings=wandb.Settings(silent=True, console="off"))
            went = self.run.settings.sync_dir
            console.print(f"wandb: {mode} ({why}): run data in {went}"
                          + (f"; upload it with `wandb sync {went}`" if mode == "offline" else ""))
            if asked and not Path(went).resolve().is_relative_to(Path(asked).resolve()):
                console.print(f"[yellow]warning:[/yellow] wandb could not write to {asked} (WANDB_DIR); "
                              f"it wrote to {went} instead")
        except Exception as exc:  # wandb is an extra: its failure is never the run's
            self.fail("start", exc)

    def __enter__(self) -> WandbRun:
        self.sinks.append(self.log_row)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.sinks.remove(self.log_row)
        self.finish(exit_code=0 if kind is None else 1)

    def log_row(self, row: dict) -> None:
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
            except Exception as exc:
                self.fail("log a train_log row", exc)

    def summarise(self, info: dict) -> None:
        """The run's final metrics (info is final_info.json's content) into the wandb summary."""
        if self.run is not None:
            try:
                self.run.summary.update(final_numbers(info))
            except Exception as exc:
                self.fail("write the final metrics", exc)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:
                self.fail("finish", exc)
            self.run = None

    def fail(self, doing: str, exc: Exception) -> None:
        console.print(f"[yellow]warning:[/yellow] wandb could not {doing} ({type(exc).__name__}: {exc}); "
                      "the run goes on without wandb")
        self.run = None


def wandb_mode() -> tuple[str, str]:
    """(mode, why): WANDB_MODE where set; else offline without an API key (WANDB_API_KEY, or the
    server's entry in the netrc file wandb login writes) or when the server does not accept a
    connection within 3 s; else online. (wandb.login would also tell about the key, but with a
    key and no network it leaves the process hanging at exit.)"""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    server = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        in_netrc = netrc.netrc(os.environ.get("NETRC")).authenticators(server.hostname) is not None
    except (OSError, netrc.NetrcParseError):
        in_netrc = False
    if not (os.environ.get("WANDB_API_KEY") or in_netrc):
        return "offline", "no API key"
    try:
        socket.create_connection((server.hostname, server.port or 443), timeout=3).close()
    except OSError:
        return "offline", f"{server.hostname} does not answer"
    return "online", "API key found"


def final_numbers(info: dict) -> dict[str, float]:
    """metrics/<group>/<name> for every number of info's metrics, final_loss/<term>, training_steps."""
    numbers = {f"metrics/{group}/{name}": value for group, values in info.get("metrics", {}).items()
               for name, value in values.items() if isinstance(value, (int, float))}
    numbers.update({f"final_loss/{term}": value for term, value in info.get("final_loss_terms", {}).items()})
    numbers["training_steps"] = info.get("training_steps", 0)
    return numbers
