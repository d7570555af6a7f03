"""recipes/train_gla.py (and its Hyena variant) on real text: the loss falls, checkpoints resume, the final model
reloads."""

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_plugins

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_gla.py"
TINY = ["--text", "wiki", "--hidden", "64", "--layers", "2", "--heads", "2", "--seq-len", "64", "--batch", "4",
        "--lr", "5e-3", "--warmup", "2", "--eval-blocks", "4"]


def _recipe():
    spec = importlib.util.spec_from_file_location("train_gla", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_loss_falls_and_the_run_resumes_and_reloads(tmp_path):
    recipe = _recipe()
    out = tmp_path / "run"
    summary = recipe.main([*TINY, "--steps", "12", "--save-every", "6", "--out", str(out)])
    losses = summary["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert json.loads((out / "summary.json").read_text())["losses"] == losses
    assert 1 < summary["heldout_perplexity"] < 49152  # better than uniform over the vocabulary
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert isinstance(reloaded, hf_plugins.GLAForCausalLM)
    resumed = recipe.main([*TINY, "--steps", "12", "--resume", str(out / "step-6"), "--out", str(tmp_path / "again")])
    # The checkpoint restores weights, optimizer and schedule: the resumed steps repeat the first run's.
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(losses[6:]), rtol=1e-4)


def test_the_hyena_recipe_trains_on_real_text(tmp_path):
    summary = _recipe().main([*TINY, "--steps", "12", "--save-every", "0", "--out", str(tmp_path)], arch="hyena")
    losses = summary["losses"]
    assert summary["model"] == "hyena" and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), hf_plugins.HyenaForCausalLM)
