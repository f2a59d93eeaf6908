"""Spiking ResNets: MS-ResNet (membrane shortcut) and the vanilla / SEW baselines."""

from models.authors import load_authors_checkpoint, to_authors_state_dict
from models.neuron import LIF, lif_sequence
from models.registry import create_model, list_models, register_model
from models.resnet import SpikingResNet

__all__ = ["LIF", "SpikingResNet", "create_model", "lif_sequence", "list_models",
           "load_authors_checkpoint", "register_model", "to_authors_state_dict"]
