"""The training side of deepspike: typed configs and recipes, the DeepSpeed wrap step, one explicit
training loop (`trainer.train.train`), checkpoints with exact resume, MLflow logging, export, evaluation
and the per-GPU batch planner."""
