"""scripts/learning_curve.py: a kept checkpoint rebuilds the model the run saved, and is measured."""
import json
import shutil

import torch

from scripts.learning_curve import main as learning_curve, model_at
from support.weights import load_model


def test_a_kept_checkpoint_is_the_saved_model_and_is_measured(train_tiny, tmp_path, capsys):
    out, curve = tmp_path / "out", tmp_path / "curve"
    assert train_tiny(out, steps=4, save_every=4, lora=4, lora_layers=1, k_max=4).returncode == 0
    curve.mkdir()
    shutil.copy(out / "ckpt.pt", curve / "ckpt_step4_min0.1.pt")
    rebuilt, step = model_at(curve / "ckpt_step4_min0.1.pt")
    saved = load_model(str(out / "model"))
    idx = torch.tensor([[1001, 11, 2001] + [saved.cfg.mask_id] * 3])
    with torch.no_grad():
        assert step == 4 and rebuilt.cfg.k_max == saved.cfg.k_max == 4 and torch.equal(rebuilt(idx), saved(idx))
    learning_curve(["measure", str(curve), "--prompts", "1", "--max-new-tokens", "8"])
    assert "minute   0.1  step     4  ConfAdapt(0.9) " in capsys.readouterr().out
    point = json.loads((curve / "curve.json").read_text())["points"][0]
    assert point["step"] == 4 and point["--verify"] >= 1.0 and point["ConfAdapt(0.9)"] >= 1.0
