"""A training run's stages: prepare (data, item text, sharded model), train (the orchestration), evaluate."""

from torchrec_mtl.run.evaluate import evaluate_checkpoint, evaluate_ensemble
from torchrec_mtl.run.prepare import PreparedJob, prepare_job
from torchrec_mtl.run.train import run_job

__all__ = ["PreparedJob", "evaluate_checkpoint", "evaluate_ensemble", "prepare_job", "run_job"]
