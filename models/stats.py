"""Spike statistics and the 45 nm energy estimate (docs/model.md §8.3), collected by hooks only while asked.

    with SpikeMonitor(model) as mon:
        model(x)
    mon.summary()  # {'spikes/rate': ..., 'energy/mj_per_image': ..., ...}

Firing rate of a LIF layer = mean of its spike output over (T, N, C, H, W); spikes per neuron per
sample = rate * T. Energy: every conv/linear counts the multiply-accumulates it actually executed
per image (so the static stem, computed once, counts once). A layer whose input is non-negative
integer-valued (spikes, or SEW's spike counts) performs accumulates only: SOPs = MACs * mean(input),
at 0.9 pJ each; any other layer (stem, MS-ResNet's real-valued 1x1 downsampling convs, the classifier
on firing rates) is charged 4.6 pJ per MAC. Outside the `with` block no hook is installed.

The hooks never wait for the device: each layer's sums stay float64 tensors where the layer ran, and the
reports (summary, layer_*) fetch them all in one transfer. The figures are those of summing Python floats per
call (float64 sums of the same float32 values, in the same order).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from models.hooks import HookContext
from models.neuron import LIF, spikes_of
from models.protocol import SpikingNetwork

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def _macs_per_output(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


class SpikeMonitor(HookContext):
    def __init__(self, model: nn.Module):
        self.model = model
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.images = 0
        # Device sums per layer (float64 tensors; see _host): spikes, MACs on real-valued input, SOPs on spikes.
        self._spikes: dict[str, torch.Tensor] = {}
        self._macs: dict[str, torch.Tensor] = {}
        self._acs: dict[str, torch.Tensor] = {}
        self.neurons: dict[str, int] = defaultdict(int)  # neuron-steps seen
        self.timesteps: dict[str, int] = {}
        self.dense: dict[str, float] = defaultdict(float)  # MACs executed, before any spike sparsity

    def __enter__(self) -> SpikeMonitor:
        self._handles.append(self.model.register_forward_pre_hook(self._count_images))
        for name, mod in self.model.named_modules():
            if isinstance(mod, LIF):
                self._handles.append(mod.register_forward_hook(self._lif_hook(name)))
            elif isinstance(mod, nn.Conv2d | nn.Linear):
                self._handles.append(mod.register_forward_hook(self._synapse_hook(name)))
        return self

    def _count_images(self, module, args) -> None:
        x = args[0]
        self.images += x.shape[0] if x.dim() == 4 else x.shape[1]

    @staticmethod
    def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        sums[name] = sums[name] + value if name in sums else value

    def _lif_hook(self, name):
        def hook(module, args, out):
            out = spikes_of(out)
            self._add(self._spikes, name, out.detach().float().sum().double())
            self.neurons[name] += out.numel()
            self.timesteps[name] = out.shape[0]
        return hook

    def _synapse_hook(self, name):
        def hook(module, args, out):
            x = args[0].detach()
            macs = out.numel() * _macs_per_output(module)
            self.dense[name] += macs
            integer = ((x >= 0) & (x == x.round())).all()
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            self._add(self._acs, name, torch.where(integer, macs * x.float().mean().double(), zero))
            self._add(self._macs, name, torch.where(integer, zero, zero + macs))
        return hook

    def _host(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """The device sums as Python floats (spikes, MACs, SOPs per layer), fetched in one transfer."""
        sums = [self._spikes, self._macs, self._acs]
        keys = [(i, n) for i, d in enumerate(sums) for n in d]
        if not keys:
            return {}, {}, {}
        device = sums[keys[0][0]][keys[0][1]].device
        values = torch.stack([sums[i][n].to(device) for i, n in keys]).tolist()
        out: tuple[dict[str, float], ...] = ({}, {}, {})
        for (i, n), v in zip(keys, values):
            out[i][n] = v
        return out

    def dense_macs_per_image(self) -> float:
        return sum(self.dense.values()) / self.images

    def layer_rates(self) -> dict[str, float]:
        spikes = self._host()[0]
        return {n: spikes[n] / self.neurons[n] for n in self.neurons}

    def layer_spikes(self) -> dict[str, dict[str, float]]:
        """Per LIF layer: firing rate, spikes per neuron per sample (rate * T), neurons per sample."""
        return {n: {"rate": rate, "spikes_per_neuron": rate * self.timesteps[n],
                    "neurons": self.neurons[n] / self.timesteps[n] / max(self.images, 1)}
                for n, rate in self.layer_rates().items()}

    def layer_ops(self) -> dict[str, dict[str, float]]:
        """Per conv/linear layer, in module order, per image: dense MACs (real-valued input), synaptic
        operations (accumulates on spike input) and their 45 nm energy in mJ; sums to summary()'s."""
        if not self.images:
            raise RuntimeError("SpikeMonitor saw no forward pass")
        _, mac_sums, ac_sums = self._host()
        out = {}
        for n, _ in self.model.named_modules():
            if n in mac_sums:
                macs, sops = mac_sums[n] / self.images, ac_sums[n] / self.images
                out[n] = {"macs": macs, "sops": sops, "mj": (macs * E_MAC_PJ + sops * E_AC_PJ) * 1e-9}
        return out

    def summary(self) -> dict[str, float]:
        """MLflow-legal metrics: overall and per-stage firing rate, spikes per neuron per sample,
        synaptic operations and energy per image."""
        if not self.images:
            raise RuntimeError("SpikeMonitor saw no forward pass")
        spikes, mac_sums, ac_sums = self._host()
        total_spikes = sum(spikes.values())
        total_neuron_steps = sum(self.neurons.values())
        T = max(self.timesteps.values(), default=1)
        out = {"spikes/rate": total_spikes / max(total_neuron_steps, 1),
               "spikes/per_neuron_per_sample": total_spikes / max(total_neuron_steps / T, 1)}
        stage_of = self.model.block_stage if isinstance(self.model, SpikingNetwork) else None
        if stage_of is not None:
            per_stage: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for name in self.neurons:
                parts = name.split(".")
                if parts[0] == "blocks":
                    acc = per_stage[stage_of[int(parts[1])]]
                    acc[0] += spikes[name]
                    acc[1] += self.neurons[name]
            for stage, (s, n) in sorted(per_stage.items()):
                out[f"spikes/rate_stage{stage + 1}"] = s / n
        macs = sum(mac_sums.values()) / self.images
        sops = sum(ac_sums.values()) / self.images
        out["energy/gmacs_per_image"] = macs / 1e9
        out["energy/gsops_per_image"] = sops / 1e9
        out["energy/mj_per_image"] = (macs * E_MAC_PJ + sops * E_AC_PJ) * 1e-9
        return out
