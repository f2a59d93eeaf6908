"""The training image (cluster/Dockerfile) installs what training needs and nothing the tests alone use: the
Makefile's apt packages come in two lists, and the Dockerfile's own `make` command, dry-run here (`make -n`),
installs only the training list and training's pip extras."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = {"chromium", "fonts-dejavu-core", "postgresql"}


def make_var(name: str) -> list[str]:
    m = re.search(rf"^{name} := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"no {name} in the Makefile"
    return m[1].split()


def dockerfile_make_argv(venv: Path) -> list[str]:
    """The Dockerfile's `RUN sudo make ...` (continuation lines joined), as argv, with its venv moved to `venv`."""
    text = (ROOT / "cluster/Dockerfile").read_text().replace("\\\n", " ")
    run = next(line for line in text.splitlines() if line.startswith("RUN ") and " make " in line)
    words = shlex.split(run[4:].split("&&")[0])
    assert words[:2] == ["sudo", "make"], run
    return [w.replace("/home/ray/anaconda3", str(venv)) for w in words[1:]]


def dry_run(argv: list[str]) -> str:
    return subprocess.run([*argv, "-n"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout


def apt_installed(commands: str) -> set[str]:
    m = re.search(r"apt-get install -y -qq --no-install-recommends ([^>]*)>", commands)
    assert m, commands
    return set(m[1].split())


def test_the_apt_lists_are_split_into_training_and_test():
    train, test = set(make_var("APT_TRAIN")), set(make_var("APT_TEST"))
    assert test >= TEST_ONLY and not train & TEST_ONLY
    assert {"g++", "libjpeg-dev"} <= train  # the compiled ops' build


def test_the_dockerfile_installs_the_training_list_only(tmp_path):
    argv = dockerfile_make_argv(tmp_path / "venv")
    assert "TRAINING_ONLY=1" in argv
    image = dry_run(argv)
    assert apt_installed(image) == set(make_var("APT_TRAIN"))
    assert re.search(r'-e "\.\[ffcv,s3\]"', image) and "spikingjelly" not in image  # no dev/peers/decoders extras
    assert "models/csrc/build.py" in image  # the compiled ops are still built into the image
    # `make test` / `make demo` on a developer machine: both lists and the test extras.
    dev = dry_run(["make", f"VENV={tmp_path / 'venv'}", str(tmp_path / "venv/.deepspike-installed")])
    assert apt_installed(dev) == set(make_var("APT_TRAIN")) | set(make_var("APT_TEST"))
    assert '-e ".[ffcv,s3,dev,peers,decoders]"' in dev and "spikingjelly" in dev
