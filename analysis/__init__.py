"""Fidelity studies of the paper's claims (docs/model.md §8): gradient-norm equality / block dynamical isometry
(`gradnorm`, `gradlog` for training-time logging), no degradation with depth (`depth_sweep`), and
spikes and energy (`spikes`). Each study is one `python -m analysis.<name>` command."""
