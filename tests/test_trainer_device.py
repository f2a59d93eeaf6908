"""The training device: a run that asked for a GPU and cannot have it stops at start-up with one line naming
what it found, never trains on the CPU in silence; DeepSpeed's accelerator is the CPU only where torch finds
no GPU, chosen in one place (trainer/__init__.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.distributed import DeviceError, cuda_found, select_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch finds `n` GPUs (the CUDA stack itself is not there to use on this machine)."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_auto_takes_the_local_ranks_gpu_where_there_are_gpus_and_the_cpu_where_there_are_none(gpus):
    gpus(0)
    assert select_device("auto", 0) == torch.device("cpu")
    assert select_device("cpu", 3) == torch.device("cpu")
    gpus(2)
    assert select_device("auto", 1) == torch.device("cuda", 1)
    assert select_device("cuda", 0) == torch.device("cuda", 0)
    assert select_device("cuda:1", 0) == torch.device("cuda", 1)  # Ray Train's assignment wins over the rank


@pytest.mark.parametrize(("count", "requested", "local_rank", "needs"),
                         [(0, "cuda", 0, "GPU 0 (local rank 0)"), (2, "cuda", 2, "GPU 2 (local rank 2)"),
                          (2, "auto", 3, "GPU 3 (local rank 3)"), (1, "cuda:1", 0, "GPU 1 (local rank 0)")])
def test_a_gpu_the_rank_cannot_have_stops_it_with_what_was_found(gpus, monkeypatch, count, requested, local_rank,
                                                                  needs):
    gpus(count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError) as e:
        select_device(requested, local_rank)
    msg = str(e.value)
    assert "\n" not in msg and f"needs {needs}" in msg
    assert f"{count} GPU(s) usable" in msg and "CUDA_VISIBLE_DEVICES='0,1'" in msg
    assert f"built for CUDA {torch.version.cuda or 'none (CPU-only build)'}" in msg and "driver" in msg


def test_ds_accelerator_cpu_on_a_gpu_rank_is_an_error(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(DeviceError, match="DS_ACCELERATOR is 'cpu' on a node that trains on cuda:0"):
        select_device("cuda", 0)
    assert select_device("cpu", 0) == torch.device("cpu")


def test_engine_device_values_are_checked():
    from trainer.config import EngineConfig

    for ok in ("auto", "cpu", "cuda", "cuda:3"):
        assert EngineConfig(device=ok).device == ok
    with pytest.raises(ValueError, match="engine.device='gpu'"):
        EngineConfig(device="gpu")


def test_train_asking_for_cuda_without_a_gpu_stops_at_start_up_with_one_line(tmp_path):
    """The whole command line, with CUDA hidden as on a node whose driver torch cannot use."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--recipe", "digits_tiny", "--set",
                           "engine.device=cuda", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("[trainer] stopped:")]
    assert stopped == [f"[trainer] stopped: engine.device=cuda needs GPU 0 (local rank 0) but this process finds "
                       f"{cuda_found_with_hidden_gpus()}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def cuda_found_with_hidden_gpus() -> str:
    code = "import os, torch; from trainer.distributed import cuda_found; print(cuda_found())"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_cuda_found_names_what_is_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert re.search(r"CUDA_VISIBLE_DEVICES=''$", cuda_found())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_found().endswith("CUDA_VISIBLE_DEVICES=unset")


def test_deepspeed_gets_the_cpu_accelerator_from_the_trainer_package_where_torch_finds_no_gpu():
    code = ("import os, trainer.config, deepspeed\nfrom deepspeed.accelerator import get_accelerator\n"
            "print('RESULT', os.environ.get('DS_ACCELERATOR'), get_accelerator().device_name())")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT cpu cpu" in proc.stdout
    assert "unable to detect" not in proc.stderr  # DeepSpeed's warning when it has to guess


def test_where_torch_finds_a_gpu_the_accelerator_is_left_to_deepspeed_and_a_hand_set_one_is_kept(monkeypatch):
    import trainer

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer.choose_ds_accelerator()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer.choose_ds_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    trainer.choose_ds_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


# Writes of the variable: shell and make assignments, keyword arguments, dict items, environ/setenv calls.
SETS_DS_ACCELERATOR = re.compile(r'DS_ACCELERATOR"?\]?\s*[?:]?=(?!=)|"DS_ACCELERATOR"\s*:|'
                                 r'(setdefault|setenv|putenv)\(\s*"DS_ACCELERATOR"')


def test_ds_accelerator_is_set_in_one_place():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    setters = {f for f in files if f != "tests/test_trainer_device.py" and (ROOT / f).is_file()
               and Path(f).suffix in (".py", ".sh", ".yaml", ".toml", ".cfg", "") and
               SETS_DS_ACCELERATOR.search((ROOT / f).read_text(errors="replace"))}
    assert setters == {"trainer/__init__.py"}
    assert SETS_DS_ACCELERATOR.search('export DS_ACCELERATOR ?= cpu') and SETS_DS_ACCELERATOR.search(
        'env = dict(os.environ, DS_ACCELERATOR="cpu")') and SETS_DS_ACCELERATOR.search('{"DS_ACCELERATOR": "cpu"}')
