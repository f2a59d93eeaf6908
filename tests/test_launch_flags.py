"""Every command line's flags, and the launchers' checks before any Ray resource is requested.

The flags of every `python -m` entry point are frozen here, so that one spelling holds for each quantity
(`--dataset NAME`, `--data PATH`, `--size`, `--batch-size`, `--out DIR`, a repeatable `--set`). Each bad
launcher input is one `error: ...` line and exit code 2. These run without a Ray cluster: the checks that
need one (more nodes than the cluster has) are in test_launch_ray.py.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from launch.common import ROOT, LaunchError, build_config, main, parse_args
from launch.common import _runtime_env as runtime_env
from trainer.set_aside import set_aside

CIFAR = ("cifar10", "digits")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "digits16"
    subprocess.run([sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(out), "--format",
                    "wds", "--size", "16", "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    return out


def config(*argv: str, datasets=CIFAR):
    return build_config(parse_args(list(argv), "digits_tiny"), datasets)


# A new flag needs a reason: a trainer setting is a `--set key=value` override of the recipe, and a new
# flag takes the spelling its quantity already has on the other commands.
FLAGS = {
    "launch.common": {"--nodes", "--gpus-per-node", "--recipe", "--data", "--run-name", "--storage", "--set",
                      "--no-resume", "--dry-run", "--min-nodes"},
    "trainer.train": {"--config", "--list", "--no-resume", "--recipe", "--resume", "--run-name", "--set"},
    "trainer.evaluate": {"model", "--config", "--set", "--split", "--tracking-uri"},
    "trainer.export": {"checkpoint", "--out"},
    "analysis.depth_sweep": {"--T", "--collect-only", "--data", "--dataset", "--depths", "--epochs", "--experiment",
                             "--families", "--jobs", "--launcher", "--out", "--runs-dir", "--set", "--size",
                             "--tracking-uri"},
    "analysis.gradnorm": {"--T", "--batch-size", "--batches", "--ckpt", "--dataset", "--device", "--models", "--out",
                          "--probes", "--seed", "--size"},
    "analysis.spikes": {"ckpt", "--T", "--batch-size", "--dataset", "--out", "--precision", "--size"},
    "bench.gradlog_overhead": {"--T", "--batch-size", "--device", "--model", "--size", "--steps"},
    "bench.launch": {"--steps", "--warmup"},
    "bench.loaders": {"--batch-size", "--classes", "--epochs", "--max-side", "--per-class", "--workers"},
    "bench.max_batch": {"--T", "--calib-size", "--cap-gib", "--device", "--gpu-mem", "--model", "--reserve-gib",
                        "--settings", "--size", "--validate"},
    "bench.memory": {"--T", "--batch-size", "--configs", "--device", "--out", "--rows", "--settings", "--steps",
                     "--threads", "--worker"},
    "bench.models": {"--configs", "--out", "--profile", "--repeat", "--rows", "--threads", "--worker"},
    "dataloaders.convert": {"dataset", "--format", "--frames", "--jpeg-quality", "--max-side", "--no-verify-md5",
                            "--on-error", "--out", "--shard-size", "--size", "--smart-threshold", "--src",
                            "--train-fraction", "--workers", "--write-mode"},
    "dataloaders.synthetic": {"dataset", "--classes", "--out", "--per-class", "--seed", "--test-per-class",
                              "--val-per-class"},
    # The GPU acceptance harness: bench/gpu_check.sh runs these; its stages write one JSON file each.
    "bench.gpu_check.run": {"--budget-s", "--cpu-dry-run", "--out", "--stages", "--work"},
    "bench.gpu_check.bundle": {"cmd"},
    "bench.gpu_check.speed": {"--budget-s", "--cpu-dry-run", "--json"},
    "bench.gpu_check.train": {"--cpu-dry-run", "--json", "--run-timeout", "--work"},
    "bench.gpu_check.nccl": {"--cpu-dry-run", "--json"},
    "bench.gpu_check.ray_stage": {"--cpu-dry-run", "--job-timeout", "--json", "--work"},
}


def parser_of(module: str):
    build = importlib.import_module(module).build_parser
    return build("digits_tiny") if module == "launch.common" else build()


@pytest.mark.parametrize("module", FLAGS)
def test_the_flag_set_is_frozen(module):
    actions = parser_of(module)._actions
    assert {o for a in actions for o in a.option_strings or [a.dest]} - {"-h", "--help"} == FLAGS[module]


def test_every_entry_point_is_covered():
    # The launchers are files that hand their argv to launch.common, and the demo takes no flags; every other
    # CLI is a module's main, in a package or a subpackage.
    found = {".".join(p.relative_to(ROOT).with_suffix("").parts)
             for d in ("trainer", "analysis", "bench", "dataloaders", "launch")
             for p in (ROOT / d).rglob("*.py") if "__main__" in p.read_text()}
    launchers = {"launch.imagenet", "launch.cifar10", "launch.cifar10dvs"}
    assert found - launchers - {"launch.demo"} == set(FLAGS) - {"launch.common"}
    for launcher in launchers:
        assert "common.main(RECIPE, DATASETS, argv)" in (ROOT / f"{launcher.replace('.', '/')}.py").read_text()
    assert "argparse" not in (ROOT / "launch" / "demo.py").read_text()


@pytest.mark.parametrize("module, required", [
    ("launch.common", []), ("trainer.train", ["--recipe", "digits_tiny"]), ("trainer.evaluate", ["model.pt"]),
    ("analysis.depth_sweep", ["--dataset", "digits", "--epochs", "1", "--out", "x"]),
])
def test_two_set_flags_both_apply(module, required):
    args = parser_of(module).parse_args([*required, "--set", "optim.lr=0.05", "log_every=3",
                                         "--set", "optim.epochs=2"])
    assert (args.overrides if module == "launch.common" else args.set) == ["optim.lr=0.05", "log_every=3",
                                                                            "optim.epochs=2"]


def test_unknown_recipe_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "launch/imagenet.py", "--nodes", "4", "--recipe", "ms_resnet9000"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: unknown recipe 'ms_resnet9000'; known: ")
    assert "ms_resnet104_imagenet" in r.stderr


def test_recipe_for_another_data_set_is_refused(digits):
    with pytest.raises(LaunchError) as e:
        config("--data", str(digits), datasets=("imagenet",))
    assert str(e.value) == "recipe 'digits_tiny' trains on 'digits'; this launcher runs imagenet recipes"


def test_missing_data_path(tmp_path):
    with pytest.raises(LaunchError) as e:
        config("--data", str(tmp_path / "nope"))
    nope = tmp_path / "nope"
    assert str(e.value) == (f"data path {nope} holds no converted wds train split (train/manifest.json); "
                            f"make one with python -m dataloaders.convert digits --out {nope} --format wds")


def test_global_batch_not_divisible_fails_before_ray_starts(digits, capsys):
    # digits_tiny pinned to a global batch of 8: 3 CPU workers cannot split it.
    with pytest.raises(SystemExit) as e:
        main("digits_tiny", CIFAR, ["--nodes", "3", "--gpus-per-node", "0", "--data", str(digits),
                                    "--set", "optim.global_batch=8", "data.batch_size=4", "optim.batch_policy=fixed"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: optim.global_batch=8 cannot be split over 3 ranks (batch policy "
                                       "'fixed'); use a world size that divides it, or optim.batch_policy=scale. "
                                       "--nodes and --gpus-per-node set the number of ranks.\n")
    assert not ray.is_initialized()


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "override 'optim.lrr': unknown key 'lrr'; did you mean 'optim.lr'?"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast' (e.g. --set optim.lr=1e-4)"),
    ("data.format=tfrecord", "data.format='tfrecord'; expected one of ('wds', 'ffcv')"),
])
def test_bad_override(digits, override, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config("--data", str(digits), "--set", override)


def test_bad_node_counts_and_names(digits):
    with pytest.raises(LaunchError, match="--nodes must be >= 1, got 0"):
        config("--nodes", "0", "--data", str(digits))
    with pytest.raises(LaunchError, match="--gpus-per-node must be >= 0, got -1"):
        config("--gpus-per-node", "-1", "--data", str(digits))
    with pytest.raises(LaunchError, match="must be a plain name"):
        config("--run-name", "a/b", "--data", str(digits))


def test_config_for_the_workers(digits, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(digits.parent)
    cfg = config("--data", digits.name, "--storage", str(tmp_path / "st"), "--set", "optim.lr=0.05")
    # Workers run elsewhere: paths are absolute, the run lives in <storage>/<name> with its MLflow store.
    assert cfg.data.path == str(digits) and cfg.optim.lr == 0.05
    assert cfg.run_name.startswith("digits_tiny-") and cfg.run_dir == str(tmp_path / "st" / cfg.run_name)
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'st' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert config("--data", digits.name, "--run-name", "x").mlflow.tracking_uri == "http://127.0.0.1:5999"


def test_storage_rules(digits, tmp_path):
    with pytest.raises(LaunchError, match="the trainer still needs a shared filesystem"):
        config("--data", str(digits), "--storage", "s3://bucket/runs")
    cfg = config("--data", str(digits), "--storage", "s3://bucket/runs", "--set", "run_dir=/shared/r1")
    assert cfg.run_dir == "/shared/r1"
    with pytest.raises(LaunchError, match="--no-resume cannot move a run aside in s3://bucket/runs"):
        config("--data", str(digits), "--storage", "s3://bucket/runs", "--no-resume", "--set", "run_dir=/x")
    with pytest.raises(LaunchError, match="run_dir=/x cannot be set here"):
        config("--data", str(digits), "--storage", str(tmp_path), "--set", "run_dir=/x")


def test_no_resume_moves_the_earlier_run_aside(tmp_path):
    run = tmp_path / "r1"
    (run / "checkpoints").mkdir(parents=True)
    aside = set_aside(run)
    assert not run.exists() and aside.name.startswith("r1.replaced-") and (aside / "checkpoints").is_dir()
    assert set_aside(run) is None


def test_code_is_shipped_unless_the_job_brought_its_own(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert runtime_env() == {"working_dir": str(ROOT)}
    # What `ray job submit --working-dir .` hands to the entrypoint.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    assert runtime_env() == {}
