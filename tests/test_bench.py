"""bench.py on a tiny model: one interleaved run reports the machine, the pass cost by rows against
its two floors, and k=1, ConfAdapt and --verify on the same prompts, sized and with the whole block;
--verify's text is k=1's on every prompt."""
import json

import pytest


def test_bench_reports_every_figure(script, tiny_qwen, fixtures):
    r = script("bench.py", "--init", tiny_qwen, "--prompts", "2", "--max-new-tokens", "12", "--k-max", "4",
               "--blocks", "sized", "full", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert "cores" in report["machine"] and report["prompts"] == 2
    names = set(report["e_strategies"])
    assert names == {"k=1", "ConfAdapt(0.9), sized", "ConfAdapt(0.9), full", "verify quadratic, sized",
                     "verify quadratic, full"}
    for name, e in report["e_strategies"].items():
        assert e["tokens_per_s"] > 0 and e["acceleration"] >= 1 and e["rows_per_pass"] >= 1, name
        if name.startswith("verify"):
            assert e["same_text_as_k1"] == "2/2", name
    full = report["e_strategies"]["verify quadratic, full"]
    assert full["rows_per_pass"] > 1  # the whole block: drafts, and a branch of 3 masks after each
    cost = report["f_pass_cost"]
    assert [int(r) for r in cost["rows"]] == [1, 2, 4, 8, 16, 32]
    for row in cost["rows"].values():
        assert row["ms"] > 0 and row["bytes_floor_ms"] > 0 and row["flops_floor_ms"] > 0
    timed = report["g_decode_pass_ms"]  # the sized passes, as decoding timed them
    assert timed and all(g["ms"] > 0 and g["passes"] >= 1 for g in timed.values())
    assert report["a_ours_k1_vs_transformers"] > 0 and report["c_k1_fraction_of_bound"] > 0


def test_bench_bad_input(script, tiny_qwen):
    r = script("bench.py", "--init", tiny_qwen / "missing", "--prompts", "1")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr


def test_bench_against_the_original(script, tiny_qwen, fixtures):
    """(h) and (i) alone, on the last GSM8K test problems (--offset): the original's k=1 is the
    reference row, --verify gives its text and so its teacher loss, and each pass has a profile."""
    r = script("bench.py", "--init", tiny_qwen, "--against-original", "--offset", "1317", "--prompts", "5",
               "--max-new-tokens", "12", "--k-max", "4", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["prompts"] == 2 and report["offset"] == 1317  # GSM8K's test split ends at 1319
    h = report["h_against_original"]
    assert set(h) == {"original", "original k=1", "ConfAdapt(0.9)", "--verify"}
    assert h["original k=1"]["vs_original"] == 1.0 and h["--verify"]["same_text"] == 1.0
    assert h["--verify"]["teacher_loss"] == pytest.approx(h["original k=1"]["teacher_loss"], rel=1e-4)
    profile = report["i_pass_profile"]
    assert [int(rows) for rows in profile] == [1, 2, 4, 16]
    for p in profile.values():
        assert p["ms"] > 0 and p["rest_ms"] > 0 and p["top"] and all(name for name, _, _ in p["top"])
    past = script("bench.py", "--init", tiny_qwen, "--against-original", "--offset", "1319")
    assert past.returncode != 0 and past.stderr.startswith("error:") and "past the last" in past.stderr, past.stderr
