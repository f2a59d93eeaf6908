"""The per-GPU batch planner's arithmetic (its GPU measurements: bench/gpu_check.sh), and its command line
on a CPU at toy size."""

import pytest

from bench.max_batch import Fit, GiB, main, parse_setting, search_largest


def test_planner_settings_and_batch_arithmetic():
    assert parse_setting("none") == (0, 1) and parse_setting("4") == (4, 1) and parse_setting("1x8") == (1, 8)
    fit = Fit("1", held=1 * GiB, step_fixed=0.5 * GiB, per_image=0.1 * GiB, calib_res=64)
    assert fit.peak(2, 128) == (1 + 0.5 + 2 * 0.4) * GiB  # activations scale with the pixel count
    assert fit.max_batch(128, 10 * GiB) == 21  # (10 - 1.5) / 0.4
    assert fit.max_batch(128, 1 * GiB) == 0


@pytest.mark.parametrize("answer", [0, 1, 7, 64, 100, 333])
@pytest.mark.parametrize("start", [1, 50, 400])
def test_largest_batch_search_finds_the_boundary_from_any_start(answer, start):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= answer

    assert search_largest(fits, start, grow=1.25) == answer  # tol=0: exact
    assert search_largest(fits, start, grow=2.0) == answer
    probes.clear()
    near = search_largest(fits, start, grow=1.25, tol=0.05)
    assert near <= answer and answer - near <= max(1, 0.05 * near)
    assert all(b >= 0 for b in probes)


def test_the_command_line_runs_every_setting_on_cpu(capsys):
    main(["--model", "ms_resnet20", "--T", "1", "--size", "16", "--calib-size", "8", "--settings", "none,1",
          "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ms_resnet20, T=1, 16px, bf16, SGD; budget 72.5 GiB of 80 GB; calibrated on cpu at 8px")
    assert [line.split()[0] for line in out[2:]] == ["none", "every"]
