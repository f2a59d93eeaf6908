"""The GPU acceptance check for one offline GPU machine, run by `bash bench/gpu_check.sh` (its --help says
how); not a benchmark, and never run by CI on a GPU. One module per part:

- `bundle`: the offline wheel bundle (`--bundle DIR`) and the rehearsal's stand-in for the GPU machine
- `run`: the stages in order, each a subprocess with its own timeout, and gpu_check.json
- `speed`, `train`, `nccl`, `ray_stage`: the stages (`run`'s docstring lists what each checks)

A session with a GPU machine for 15 minutes: build the bundle here first
(`bash bench/gpu_check.sh --bundle gpu_bundle`, ~20 MiB, ignored by git), carry `gpu_bundle` with the
working tree, run `bash bench/gpu_check.sh $OUT/gpu_check` there once (6 minutes budgeted: bundle install,
op build, stages), and read `$OUT/gpu_check/gpu_check.json` and `gpu_check.log`.
"""
