"""The feature dashboard (`experiment.py dashboard RUN_DIR`): its statistics stream exactly, it
reads the SAE through its own encode on every study's last plugin and every baseline, the page
opens in headless Chromium with no console error and shows the contexts; and `run --wandb`
writes the train log and final metrics to an offline wandb run, and a broken wandb only warns."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from helpers import cli, read_log, tiny_run

import dashboard
import experiment
import sources

LATENT_ROW = re.compile(r'<tr><td data-v="(\d+)">.*?</td><td data-v="([^"]+)">.*?</td><td data-v="([^"]+)">')


def last_plugins() -> list[str]:
    """Each study's highest-numbered run (every baseline: they are all run 0)."""
    number = {key: int(key.split("/run_")[1].split("_")[0]) for key in experiment.plugin_files()}
    last = {key.split("/")[0]: n for key, n in sorted(number.items(), key=lambda kv: kv[1])}
    return sorted(key for key, n in number.items() if n == last[key.split("/")[0]])


def index_rows(page: str) -> list[tuple[int, float, float]]:
    """(latent, density, max activation) of each index row, in page order."""
    return [(int(i), float(d), float(m)) for i, d, m in LATENT_ROW.findall(page)]


# ---- the statistics ---------------------------------------------------------------------------

def streamed(f: torch.Tensor, batch: int, tracked: torch.Tensor) -> dashboard.LatentStats:
    stats = dashboard.LatentStats(f.shape[2], tracked)
    for first in range(0, len(f), batch):
        stats.add(f[first:first + batch], first, f[first:first + batch, :, 0].numel())
    return stats


@pytest.fixture
def latents() -> torch.Tensor:
    """(12 contexts, 40 positions, 6 latents), sparse; latent 5 never fires."""
    gen = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(12, 40, 6, generator=gen) - 1.0) * torch.rand(12, 40, 6, generator=gen).exp()
    f[..., 5] = 0
    return f


def test_counts_histograms_and_top_contexts_are_exact_whatever_the_batch(latents):
    tracked = torch.tensor([0, 2, 5])
    fired = (latents > 0).flatten(0, 1).sum(0)
    peaks = latents.amax(dim=1)  # (contexts, latents)
    for batch in (1, 5, 12):
        stats = streamed(latents, batch, tracked)
        assert stats.tokens == 12 * 40 and torch.equal(stats.fired, fired)
        assert torch.equal(stats.max, latents.flatten(0, 1).amax(0))
        assert torch.equal(stats.histogram.sum(1), fired[tracked])
        for row, latent in enumerate(tracked.tolist()):
            firing = peaks[:, latent] > 0
            expected = peaks[:, latent][firing].sort(descending=True).values[:dashboard.TOP_CONTEXTS]
            kept = stats.top.value[row][stats.top.value[row] > 0]
            assert torch.equal(kept, expected)
    assert (stats.top.value[2] == 0).all() and stats.top.key[2].isinf().all()  # the silent latent keeps nothing


def test_kept_examples_carry_their_token_and_the_window_around_it(latents):
    stats = streamed(latents, 5, torch.arange(6))
    for examples in (stats.top, stats.samples):
        for latent in range(5):
            for j in (examples.value[latent] > 0).nonzero().flatten().tolist():
                context, position = int(examples.context[latent, j]), int(examples.position[latent, j])
                assert examples.value[latent, j] == latents[context, position, latent]
                first = max(0, position - dashboard.BEFORE)
                window = examples.window[latent, j, first - position + dashboard.BEFORE:]
                shown = latents[context, first:position + dashboard.AFTER + 1, latent]
                assert torch.equal(window[:len(shown)], shown) and (window[len(shown):] == 0).all()


def test_the_sample_is_distinct_firing_tokens_as_many_as_fire_up_to_its_size(latents):
    stats = streamed(latents, 5, torch.arange(6))
    for latent in range(6):
        kept = stats.samples.value[latent] > 0
        where = set(zip(stats.samples.context[latent][kept].tolist(), stats.samples.position[latent][kept].tolist()))
        assert len(where) == int(kept.sum()) == min(dashboard.SAMPLES, int(stats.fired[latent]))


def test_latent_flags_are_parsed_and_bad_ones_refused():
    assert dashboard.parse_latents("0-3,7, 2", 16) == [0, 1, 2, 3, 7]
    assert dashboard.selection(None, None, "density", 16) == dashboard.Selection(top=16, by="density")
    for latents, top, by, message in [("0-16", None, "density", "outside"), ("a-b", None, "density", "not an id"),
                                      ("1", 3, "density", "both"), (None, 3, "size", "--by"), (None, 0, "density", "positive")]:
        with pytest.raises(experiment.HarnessError, match=message):
            dashboard.selection(latents, top, by, 16)


class WordTokenizer:
    """'w17' -> token 17; BOS is 0."""
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(word[1:]) for word in text.split()]}


def test_more_text_than_the_eval_contexts_is_the_text_after_the_training_text(tmp_path):
    words = iter(range(1, 10**6))
    (tmp_path / "docs.txt").write_text("\n\n".join(" ".join(f"w{next(words)}" for _ in range(50)) for _ in range(400)))
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline", dataset=str(tmp_path / "docs.txt"), tokens=2000)
    model = SimpleNamespace(tokenizer=WordTokenizer())
    train, eval_tokens = sources.load_tokens(cfg, model)
    contexts, source = dashboard.held_out_contexts(eval_tokens, 40 * 31, cfg, lambda c: sources.load_tokens(c, model))
    after = contexts[len(eval_tokens):]
    assert torch.equal(contexts[:len(eval_tokens)], eval_tokens) and len(contexts) == 40
    assert after[after > 0].min() == train.max() + 1  # the next word after the last one training read
    assert (after[after > 0].diff() == 1).all() and "after its training text" in source


def test_synthetic_text_gives_its_eval_contexts_and_refuses_more():
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
    eval_tokens = torch.ones(16, 32, dtype=torch.long)
    assert torch.equal(dashboard.held_out_contexts(eval_tokens, None, cfg, None)[0], eval_tokens)
    with pytest.raises(experiment.HarnessError, match="at most that"):
        dashboard.held_out_contexts(eval_tokens, 16 * 31 + 1, cfg, None)


# ---- the command on trained runs --------------------------------------------------------------

def direct_densities(run_dir: Path) -> torch.Tensor:
    """Each latent's firing frequency on the run's eval contexts, from the saved SAE's encode."""
    cfg, plugin = experiment.saved_config(run_dir, "test")
    model, device = sources.load_model(cfg.model, torch.device("cpu")), torch.device("cpu")
    contexts = torch.load(run_dir / "eval_tokens.pt")
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=[cfg.hook_name])
        f = experiment.saved_sae(run_dir, cfg, plugin, device).encode(cache[cfg.hook_name][contexts != contexts[0, 0]])
    return (f > 0).float().mean(0)


@pytest.mark.e2e
@pytest.mark.parametrize("key", last_plugins())
def test_dashboard_of_a_tiny_run_reads_the_sae_through_its_own_encode(key, tmp_path):
    run_dir = tmp_path / "run"
    tiny_run(key, run_dir, tmp_path / "notes.md", evals=(), tokens=2048)  # 8 steps: any trained SAE will do
    result = cli("dashboard", str(run_dir), "--latents", "0-15")
    assert result.exit_code == 0, result.output
    page = (run_dir / "dashboard" / "index.html").read_text()
    rows = sorted(index_rows(page))
    assert [latent for latent, _, _ in rows] == list(range(16))
    assert torch.allclose(torch.tensor([d for _, d, _ in rows]), direct_densities(run_dir)[:16], rtol=1e-4)
    assert re.search(r'<span class="m"[^>]*>#\d+ </span>', page)  # token ids: the tiny model has no tokenizer


@pytest.mark.e2e
def test_top_latents_by_max_activation_and_the_plugins_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    tiny_run("freq_order/run_2_freq_ordering", run_dir, tmp_path / "notes.md", evals=(), tokens=2048)
    assert cli("dashboard", str(run_dir), "--top", "5", "--by", "activation").exit_code == 0
    page = (run_dir / "dashboard" / "index.html").read_text()
    everything = cli("dashboard", str(run_dir), "--top", "256", "--by", "activation")
    assert everything.exit_code == 0
    maxima = sorted((m for _, _, m in index_rows((run_dir / "dashboard" / "index.html").read_text())), reverse=True)
    assert sorted((m for _, _, m in index_rows(page)), reverse=True) == maxima[:5]
    assert "feature_frequencies" in page and "rank in frequency_order" in page


def test_a_folder_without_a_trained_sae_is_refused(tmp_path):
    result = cli("dashboard", str(tmp_path))
    assert result.exit_code == 2 and "not a run folder" in result.output


# ---- in a real browser ------------------------------------------------------------------------

def render(page: Path, query: str = "") -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran in headless Chromium, and every console message it
    logged (an uncaught exception is one; the page itself logs nothing)."""
    assert shutil.which("chromium"), "Chromium is missing: apt-get install -y chromium (.ci/run installs it)"
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", page.as_uri() + query], capture_output=True, text=True, timeout=120)
    return done.stdout, re.findall(r":CONSOLE[^\]]*\] (.*)", done.stderr)


@pytest.fixture(scope="module")
def tiny_page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard")
    tiny_run("baseline/run_0_baseline", folder / "run", folder / "notes.md", evals=())
    assert cli("dashboard", str(folder / "run"), "--latents", "0-19").exit_code == 0
    return folder / "run" / "dashboard" / "index.html"


@pytest.mark.e2e
def test_the_page_opens_in_chromium_without_console_errors_and_shows_every_latents_contexts(tiny_page):
    html = tiny_page.read_text()
    assert not re.search(r'(src|href)="(?!#)', html), "the page must load nothing from anywhere"
    for query, column in (("", 1), ("?by=activation", 2)):
        dom, console = render(tiny_page, query)
        assert console == [] and 'data-ready="yes"' in dom
        rows = index_rows(dom)
        values = [row[column] for row in rows]
        assert len(rows) == 20 and values == sorted(values, reverse=True)  # the script sorted the index
    for latent in range(20):
        section = dom.split(f'id="l{latent}"')[1].split("</section>")[0]
        assert section.count('<code class="ctx">') >= 2 and '<span class="m"' in section


@pytest.mark.e2e
def test_the_browser_check_catches_a_script_error(tiny_page, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(tiny_page.read_text().replace('sortBy(new URLSearchParams', 'sortBy(undefinedName'))
    dom, console = render(broken)
    assert any("Uncaught ReferenceError: undefinedName" in message for message in console)
    assert 'data-ready="yes"' not in dom


# ---- wandb ------------------------------------------------------------------------------------

def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of chunks, each
    a 7-byte header of checksum, length, type; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, at, chunks, records = path.read_bytes(), 7, [], []  # the file starts with ':W&B', magic, version
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        length, kind = int.from_bytes(data[at + 4:at + 6], "little"), data[at + 6]
        chunks.append(data[at + 7:at + 7 + length])
        at += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def items(entries) -> dict:
    """A record's items: {key: value}; wandb writes a key as `key` or as the path `nested_key`."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in entries}


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


@pytest.mark.e2e
def test_run_with_wandb_offline_holds_every_train_log_row_and_the_final_metrics(tmp_path, no_wandb_key):
    run_dir = tmp_path / "run"
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(run_dir),
                 "--notes", str(tmp_path / "notes.md"), "--wandb")
    assert result.exit_code == 0, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("wandb: offline (no API key)")]) == 1
    wandb.teardown()  # wandb's service writes the file out when it stops, as at the end of a CLI process
    records = wandb_records(next(no_wandb_key.glob("wandb/offline-run-*/run-*.wandb")))
    history = {row["_step"]: row for row in (items(r.history.item) for r in records if r.HasField("history"))}
    log = read_log(run_dir)
    assert sorted(history) == [row["step"] for row in log]
    for row in log:
        assert all(history[row["step"]][k] == pytest.approx(v) for k, v in row.items() if k != "step")
    summary = {k: v for r in records if r.HasField("summary") for k, v in items(r.summary.update).items()}
    info = json.loads((run_dir / "final_info.json").read_text())
    ce_score = info["metrics"]["model_performance_preservation"]["ce_loss_score"]
    assert summary["metrics/model_performance_preservation/ce_loss_score"] == pytest.approx(ce_score)
    assert summary["final_loss/total_loss"] == pytest.approx(info["final_loss"])
    config = items(next(r for r in records if r.HasField("run")).run.config.update)
    assert config["plugin"] == "baseline/run_0_baseline" and config["dict_size"] == 256
    assert experiment.StepLog.sinks == []


def test_a_key_without_network_logs_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    assert dashboard.wandb_mode() == ("offline", "127.0.0.1 does not answer")


class BrokenWandb:
    """A wandb whose init, or whose every log call, raises."""

    def __init__(self, broken: str):
        self.broken = broken

    def init(self, **kwargs):
        if self.broken == "init":
            raise OSError("disk full")
        return SimpleNamespace(settings=SimpleNamespace(sync_dir=kwargs["dir"]), summary={}, finish=lambda **k: None,
                               log=lambda *a, **k: (_ for _ in ()).throw(RuntimeError("connection lost")))

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        return None


@pytest.mark.parametrize("broken, message", [("init", "could not start (OSError: disk full)"),
                                             ("log", "could not log a train_log row (RuntimeError")])
@pytest.mark.e2e
def test_a_failing_wandb_only_warns(broken, message, tmp_path, no_wandb_key, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", BrokenWandb(broken))
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(tmp_path / "run"),
                 "--notes", str(tmp_path / "notes.md"), "--evals", "", "--wandb")
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: wandb could not") == 1 and message in result.output
    assert json.loads((tmp_path / "run" / "final_info.json").read_text())["status"] == "completed"


@pytest.mark.e2e
def test_an_unwritable_wandb_dir_only_warns(tmp_path, no_wandb_key, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "a_file" / "wandb"))  # nothing can be made under a file
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(tmp_path / "run"),
                 "--notes", str(tmp_path / "notes.md"), "--evals", "", "--wandb")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "final_info.json").read_text())["status"] == "completed"
    assert f"warning: wandb could not write to {tmp_path / 'a_file' / 'wandb'}" in result.output
