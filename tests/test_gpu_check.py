"""scripts/gpu_check.py, the GPU run, in its --tiny mode on the CPU: every measurement it makes on a
GPU runs here on tiny shapes, so that the script a GPU session relies on cannot rot."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_run_runs_tiny_on_the_cpu(tmp_path, fixtures, tiny_tokenizer):
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--tiny", "--tokenizer", str(tiny_tokenizer), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_name = {}
    for x in results:
        by_name.setdefault(x["name"], []).append(x)
    assert "error" not in by_name, by_name.get("error")
    assert set(by_name) >= {"logits_cpu_vs_device", "k1_equals_greedy", "verify_equals_k1", "attention_path",
                            "training", "against_original", "qwen3_4b_setup", "qwen3_4b_step", "decode_pass_ms",
                            "k1_vs_bandwidth", "captured_pass_ms", "smollm2_vs_transformers", "plan_on_card",
                            "mtp_vs_plain_warm", "done"}
    assert len(by_name["plan_on_card"]) == 4 and all(x["step_seconds"] > 0 for x in by_name["plan_on_card"])
    assert by_name["mtp_vs_plain_warm"][0]["floor"] > 1
    checks = [x for name in ("logits_cpu_vs_device", "k1_equals_greedy", "verify_equals_k1") for x in by_name[name]]
    assert all(x["ok"] in (True, None) for x in checks) and len(checks) == 12
    assert by_name["training"][0]["exit"] == 0
    assert {x["dtype"] for x in by_name["against_original"]} == {"float32", "bfloat16"}
    first_step = by_name["qwen3_4b_step"][0]
    assert first_step["master_moved"] > 0.99 and 0 < first_step["bf16_moved"] < 1  # lr 1e-5 rounds most away
    parts = sorted((out / "adapter").glob("adapter.safetensors.part*"))
    assert (out / "adapter" / "adapter_config.json").is_file() and parts
    assert len(list(out.rglob("*"))) <= 8 + 1  # what one device call brings back: 8 files (and the folder)
