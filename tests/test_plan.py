"""train.py's plan, made from the model's config before any download: Qwen3-4B on the cards people own
or rent (--gpu-memory, on a CPU), the CPU hour by the memory still available, one line when nothing
fits, and one line when memory runs out anyway."""
import pytest
import torch

import support.plan as plan_py
from support.plan import n_adapter, n_params
from support.weights import model_config

QWEN3_4B_PLANS = {  # card (GiB) -> what the plan must say
    24: "plan: gated LoRA rank 128 in all 36 blocks (not the paper's full fine-tune",
    47.5: "plan: gated LoRA rank 128 in all 36 blocks (not the paper's full fine-tune",
    79.6: "plan: full fine-tune, activation checkpointing on, micro-batch 16 x 8",  # 70.9 GiB of 71.6: the rule's knife edge
    140.4: "plan: full fine-tune, activation checkpointing off, micro-batch 16 x 8",
}


@pytest.fixture
def offline(monkeypatch):
    """Any download is an error: the plan reads the preset's config from the code."""
    def no_download(*a, **kw):
        raise AssertionError("the plan downloaded something")
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_download)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)


@pytest.mark.parametrize("gib", list(QWEN3_4B_PLANS))
def test_qwen3_4b_on_each_card(script, tmp_path, offline, gib):
    r = script("train.py", "--init", "qwen3-4b", "--gpu-memory", gib, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(QWEN3_4B_PLANS[gib]), r.stdout
    assert f"of {gib:.1f} free on a {gib:g} GiB GPU" in r.stdout and not (tmp_path / "out").exists()
    if gib == 140.4:  # the H200's measured step: 2.7 s, 8 hours of them
        assert "a step about 2.7 s (measured on an H200), about 10,666 steps" in r.stdout


def test_a_flag_is_kept_or_refused(script, tmp_path, offline):
    """Without checkpointing an 80 GB card takes the full fine-tune at a smaller micro-batch (the same 128
    rows a step); the full fine-tune on 24 GiB cannot fit, and says so in one line."""
    r = script("train.py", "--init", "qwen3-4b", "--gpu-memory", "79.6", "--checkpoint-activations", "off",
               "--out", tmp_path / "a")
    assert r.returncode == 0 and "full fine-tune, activation checkpointing off, micro-batch 2 x 64" in r.stdout, r.stdout
    r = script("train.py", "--init", "qwen3-4b", "--gpu-memory", "24", "--lora", "0", "--out", tmp_path / "b")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "qwen3-4b does not fit a 24 GiB GPU (--gpu-memory)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("available,expect", [(24, "checkpointing off, micro-batch 4 x 1; frozen rows kept in up to 8.0"),
                                              (16, "checkpointing off, micro-batch 4 x 1; frozen rows kept in up to 5.0"),
                                              (8, "checkpointing on, micro-batch 4 x 1; frozen rows kept in up to 2.3"),
                                              (2, None)])
def test_the_cpu_hour_by_the_memory_available(script, tmp_path, monkeypatch, available, expect):
    """The CPU hour's plan weighs MemAvailable, faked here: it keeps what fits, the frozen rows in what the
    run leaves (its 3.1 GiB of them all on 16 GiB, part on 8: the rest are made every step,
    tests/test_frozen.py), and on 2 GiB refuses in one line before anything is loaded."""
    monkeypatch.setattr(plan_py, "available_host_gib", lambda: available)
    r = script("train.py", "--plan", "--device", "cpu", "--out", tmp_path / "out")
    if expect is None:
        assert r.returncode != 0 and "smollm2-135m does not fit this CPU (MemAvailable)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    else:
        assert r.returncode == 0 and "plan: gated LoRA rank 128 in the top 4 blocks, activation " + expect in r.stdout


def test_parameter_counts_are_the_published_ones():
    """The plan's sizes from a config alone: SmolLM2-135M, Qwen3-0.6B, Qwen3-4B, Llama-3.1-8B as published."""
    names = ("smollm2-135m", "qwen3-0.6b", "qwen3-4b", "llama-3.1-8b")
    counts = {name: n_params(model_config(name)) / 1e9 for name in names}
    assert counts == pytest.approx(dict(zip(names, (0.1345, 0.596, 4.022, 8.030))), abs=0.001)
    per_block = 128 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # q, o; k, v; gate, up, down
    assert n_adapter(model_config("smollm2-135m"), 128, 4) == 4 * per_block + 576


def test_the_plan_equals_the_trained_parameters(tiny_qwen):
    """n_params of a saved model's config is the number of parameters the loaded model has."""
    from support.weights import load_model
    model = load_model(str(tiny_qwen))
    assert n_params(model_config(str(tiny_qwen))) == sum(p.numel() for p in model.parameters())


def test_out_of_memory_says_what_to_do_in_one_line(script, train_tiny, tmp_path, monkeypatch):
    """Out of memory anyway (simulated): before any checkpoint, one line that says what to change; after
    one, the line names the step it holds and the command that continues at half the micro-batch, the
    checkpoint stays readable, and that command runs (the same rows a step, other micro-batches)."""
    import shlex
    import torch
    import train
    real_step = train.train_step

    def step_until(n):
        def step(run, i):
            if i + 1 == n:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_step(run, i)
        return step
    monkeypatch.setattr(train, "train_step", step_until(1))
    r = train_tiny(tmp_path / "a", steps=4, save_every=2)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "out of memory at step 1; nothing was saved; try --batch-size 1 --grad-accum 2" in r.stderr, r.stderr
    monkeypatch.setattr(train, "train_step", step_until(3))
    r = train_tiny(tmp_path / "b", steps=4, save_every=2)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "out of memory at step 3; " in r.stderr and "ckpt.pt holds step 2" in r.stderr, r.stderr
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    command = shlex.split(r.stderr.split("rows a step): ")[1])
    assert command[-5:] == ["--batch-size", "1", "--grad-accum", "2", "--resume"], command
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = script("train.py", *command[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "the same rows a step" in resumed.stdout


def test_a_gpu_run_checks_host_memory_and_disk_before_it_starts(tmp_path, monkeypatch):
    """A full fine-tune of Qwen3-4B keeps 52 GiB of state: on disk twice while a new checkpoint replaces the
    old, and under --fsdp gathered in host memory to be written; a machine without either is refused at the
    start. Written from one GPU, the state goes to disk a tensor at a time, whatever the host memory."""
    import shutil
    from support.plan import apply_plan, plan_run
    from train import get_args
    args = get_args(["--init", "qwen3-4b", "--gpu-memory", "140.4", "--out", str(tmp_path / "out")])
    args.plan = False  # as a run on such a card would be
    plan = plan_run(args, model_config("qwen3-4b"))
    assert plan.checkpoint_gib == pytest.approx(52.4, abs=0.1)
    def disk_free(gib):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(400 << 30, 0, gib << 30))
    disk_free(400)
    monkeypatch.setattr(plan_py, "available_host_gib", lambda: 32.0)
    apply_plan(plan, args, tmp_path / "out")
    args.fsdp = True
    with pytest.raises(ValueError, match="gathered in host memory to be written: 52.4 GiB, and 32.0 GiB is available"):
        apply_plan(plan, args, tmp_path / "out")
    monkeypatch.setattr(plan_py, "available_host_gib", lambda: 256.0)
    disk_free(100)
    with pytest.raises(ValueError, match="has 100.0 GiB free on its disk; the run.s checkpoints need 104.9"):
        apply_plan(plan, args, tmp_path / "out")


WRITE_A_CHECKPOINT = """
import sys
from pathlib import Path
from types import SimpleNamespace
import torch
from support.checkpoint import save_checkpoint, tensor_bytes
from support.optim import AdamW

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

student = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(6)])
optimizer = AdamW(student.parameters(), lr=1e-3)
student(torch.randn(2, 4096)).sum().backward()
optimizer.step()
student.zero_grad(set_to_none=True)
run = SimpleNamespace(student=student, optimizer=optimizer, master=True, progress=0.5, world=1, log=print,
                      args=SimpleNamespace(fsdp=False), ckpt_path=Path(sys.argv[1]), last_good_step=None,
                      good_probe={"loss": 1.0, "teacher": 1.0})
state = {"model": student.state_dict(), "optimizer": optimizer.state_dict()}
open("/proc/self/clear_refs", "w").write("5")  # the peak resident memory starts again from here
before = kib("VmRSS")
save_checkpoint(run, 1, {"loss": 1.0, "teacher": 1.0})
print(tensor_bytes(state) / 2**30, (kib("VmHWM") - before) / 2**20)
"""


@pytest.mark.slow
def test_the_checkpoint_writer_holds_no_second_copy_of_the_state(tmp_path):
    """Writing 1.1 GiB of model and AdamW state raises the writer's peak resident memory by less than half of
    that: the state is written from where it lives, a storage at a time (on a GPU: copied to host memory one
    tensor at a time), and what is written is what --resume reads back."""
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-c", WRITE_A_CHECKPOINT, str(tmp_path / "ckpt.pt")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    state_gib, rise_gib = map(float, r.stdout.split()[-2:])
    assert state_gib >= 1.0 and rise_gib < state_gib / 2, (state_gib, rise_gib)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True, mmap=True)
    assert saved["step"] == 1 and saved["optimizer"]["state"]["0.weight"]["exp_avg"].shape == (4096, 4096)
