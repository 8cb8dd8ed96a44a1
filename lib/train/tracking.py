"""Experiment tracking: the per-epoch metrics log of a training run (metrics.csv, MLflow), and the trackers it and the
probe write to: MLflow (local file store by default in the notebooks) and, where a user asks, W&B.
Neither is required: an empty URI or project turns each off."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from lib.core.errors import DataError
from lib.core.state_io import write_csv


def mlflow_for(uri: str, experiment: str):
    """The mlflow module pointed at `uri` and `experiment`."""
    if uri.startswith("file:"):
        # The local file store needs no database packages (mlflow-skinny has none); MLflow 3 asks for this opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return mlflow


def flat_params(config: dict) -> dict:
    """A nested config as MLflow/W&B parameters: dotted names, values as text cut at MLflow's 500 characters."""
    return pd.json_normalize(config, sep=".").iloc[0].astype(str).str[:500].to_dict()


def log_table(table: pd.DataFrame, config: dict, run_name: str, key_cols: list[str], mlflow_uri: str = "",
              wandb_project: str = "", experiment: str = "photo-retrieval-probe") -> None:
    """One tracker run holding `config` and every numeric cell of `table` as a metric named by its row's key_cols
    (e.g. 'imagenet/fusion/mAP'); W&B also gets the table itself."""
    metrics = {}
    for row in table.to_dict("records"):
        prefix = "/".join(str(row[c]) for c in key_cols)
        metrics.update({f"{prefix}/{k}".replace("@", "_at_"): float(v) for k, v in row.items()
                        if k not in key_cols and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if mlflow_uri:
        mlflow = mlflow_for(mlflow_uri, experiment)
        with mlflow.start_run(run_name=run_name):
            mlflow.log_params(flat_params(config))
            mlflow.log_metrics(metrics)
    if wandb_project:
        try:
            import wandb
        except ImportError:
            raise DataError("wandb_project is set but W&B is not installed: pip install wandb, or leave "
                            "wandb_project empty") from None
        run = wandb.init(project=wandb_project, name=run_name, config=flat_params(config))
        run.log({**metrics, "table": wandb.Table(dataframe=table)})
        run.finish()


class MetricsLog:
    """Per-epoch metrics to run_dir/metrics.csv (rewritten atomically) and, when a URI is given, to MLflow.
    enabled=False writes nothing: the log of a DDP rank other than 0."""

    def __init__(self, run_dir: Path, mlflow_uri: str = "", experiment: str = "photo-retrieval", enabled: bool = True):
        self.path = run_dir / "metrics.csv"
        self.mlflow_uri, self.experiment, self.mlflow_run_id = mlflow_uri, experiment, None
        self.enabled = enabled

    def start(self, config: dict, run_name: str, run_id: str | None = None) -> None:
        if not self.mlflow_uri or not self.enabled:
            return
        mlflow = mlflow_for(self.mlflow_uri, self.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.mlflow_run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params(flat_params(config))

    def write(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        write_csv(self.path, pd.DataFrame(history))
        if self.mlflow_run_id:
            import mlflow

            row = history[-1]
            mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in row.items()
                                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)},
                               step=int(row["epoch"]))

    def end(self) -> None:
        if self.mlflow_run_id:
            import mlflow

            mlflow.end_run()
