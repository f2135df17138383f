"""scripts/learning_curve.py: a kept checkpoint rebuilds the model the run saved, and is measured."""
import json
import shutil

import torch

from scripts.learning_curve import main as learning_curve, model_at
from support.weights import load_model


def test_a_kept_checkpoint_is_the_saved_model_and_is_measured(train_tiny, tmp_path, capsys):
    out, curve = tmp_path / "out", tmp_path / "curve"
    assert train_tiny(out, steps=4, save_every=4, lora=4, lora_layers=1, k_max=4, self_answers=2).returncode == 0
    curve.mkdir()
    shutil.copy(out / "ckpt.pt", curve / "ckpt_step4_min0.1.pt")
    rebuilt, step = model_at(curve / "ckpt_step4_min0.1.pt")
    saved = load_model(str(out / "model"))
    idx = torch.tensor([[1001, 11, 2001] + [saved.cfg.mask_id] * 3])
    with torch.no_grad():
        assert step == 4 and rebuilt.cfg.k_max == saved.cfg.k_max == 4 and torch.equal(rebuilt(idx), saved(idx))
    resumed = tmp_path / "resumed"  # a second folder, as a resumed run's watch keeps: one curve from both
    resumed.mkdir()
    shutil.copy(out / "ckpt.pt", resumed / "ckpt_step4_min60.5.pt")
    learning_curve(["measure", str(resumed), str(curve), "--prompts", "1", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert "minute   0.1  step     4  ConfAdapt(0.9) " in printed and "minute  60.5  step     4" in printed
    first, second = json.loads((resumed / "curve.json").read_text())["points"]
    assert (first["minute"], second["minute"]) == (0.1, 60.5) and first["step"] == 4
    assert first["--verify"] == second["--verify"] >= 1.0 and first["ConfAdapt(0.9)"] >= 1.0
    learning_curve(["measure", str(curve), "--own-answers", str(out / "self_answers.jsonl"), "--prompts", "5",
                    "--max-new-tokens", "8"])  # the run's own training questions: both of them
    assert "on the first 2 training questions of" in capsys.readouterr().out
    assert json.loads((curve / "curve_own_answers.json").read_text())["points"][0]["--verify"] >= 1.0
