"""A run's final and best weights as MLflow 3 logged models (`mlflow.pytorch`), so that the Models tab,
the model registry and `mlflow.pytorch.load_model("models:/<id>")` can use them.

Each logged model holds the plain single-device module in eval mode (fp32 weights, as `trainer.export`
writes them), a signature and an input example taken from the validation data, the run's resolved
`config.yaml` (extra file) and the model config as model params. It is linked to the run and to the
step it came from, so MLflow attaches that step's metrics (`val/top1`, ...) to it. It is stored pickled,
so loading it needs deepspike installed (`pip install` of this project: the classes live in `models`)
and, like any pickle, runs code: load models only from a tracking server you trust.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import yaml
from mlflow.models import Model, infer_signature
from torch import nn

from trainer.export import load_exported

CONFIG_FILE = "extra_files/config.yaml"


def log_exported_model(run_id: str, name: str, model_file: str | Path, example_file: str | Path,
                       config_file: str | Path) -> str:
    """Log one exported model to `run_id` (the tracking URI must be set); returns the model id."""
    model, blob = load_exported(model_file)
    model.eval()
    example = np.load(example_file)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    params = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in blob["model"].items()}
    info = mlflow.pytorch.log_model(
        model, name=name, run_id=run_id, step=int(blob["step"]), signature=infer_signature(example, logits),
        input_example=example, params=params, extra_files=[str(config_file)],
        # The module itself, not a torch.export graph: pt2 would fix the batch size of the example and
        # lose the classes that trainer.evaluate and the spike monitors hook into.
        serialization_format="pickle",
        metadata={"deepspike": {"step": blob["step"], "epoch": blob["epoch"], "metrics": blob["metrics"]}},
        # Listed, not inferred: inference re-imports the model in a subprocess, which takes minutes here.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "deepspike"],
        tags={"deepspike.source_checkpoint": str(blob.get("source", "")), "deepspike.kind": name})
    return info.model_id


def load_logged_model(uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, dict, dict]:
    """(eval-mode module, the training config as a dict, {step, epoch, metrics}) for a `models:/...` or
    `runs:/...` URI, looked up in `tracking_uri` (None: MLflow's current tracking URI)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model = mlflow.pytorch.load_model(uri, dst_path=tmp)
        config = yaml.safe_load((Path(tmp) / CONFIG_FILE).read_text())
        meta = (Model.load(tmp).metadata or {}).get("deepspike", {})
    return model.eval(), config, meta
