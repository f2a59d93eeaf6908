"""The per-GPU batch planner's arithmetic (its measurements need a GPU: bench/gpu_check.sh)."""

from bench.plan import Fit, GiB, parse_setting


def test_planner_settings_and_batch_arithmetic():
    assert parse_setting("none") == (0, 1) and parse_setting("4") == (4, 1) and parse_setting("1x8") == (1, 8)
    fit = Fit("1", held=1 * GiB, step_fixed=0.5 * GiB, per_image=0.1 * GiB, calib_res=64)
    assert fit.peak(2, 128) == (1 + 0.5 + 2 * 0.4) * GiB  # activations scale with the pixel count
    assert fit.max_batch(128, 10 * GiB) == 21  # (10 - 1.5) / 0.4
    assert fit.max_batch(128, 1 * GiB) == 0
