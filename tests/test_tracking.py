"""Tracker logging: W&B only when asked for (a clear message when it is not installed), MLflow metrics by row key."""
import sys
import types

import pandas as pd
import pytest

from lib.core.errors import DataError
from lib.train.tracking import log_table

TABLE = pd.DataFrame({"backbone": ["a", "a"], "method": ["global", "local"], "recall@1": [0.5, 0.75],
                      "features_cached": [True, True], "note": ["x", "y"]})


def test_wandb_gets_config_metrics_and_table(monkeypatch):
    calls = {}

    class Run:
        def log(self, data):
            calls["log"] = data

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and Run(),
                                 Table=lambda dataframe: ("table", len(dataframe)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log_table(TABLE, {"probe": {"k": 20}}, "probe 1", ["backbone", "method"], wandb_project="proj")
    assert calls["init"]["project"] == "proj" and calls["init"]["config"] == {"probe.k": "20"}
    assert calls["log"]["a/global/recall_at_1"] == 0.5 and calls["log"]["a/local/recall_at_1"] == 0.75
    assert "a/global/features_cached" not in calls["log"], "flags are not metrics"
    assert calls["log"]["table"] == ("table", 2) and calls["finished"]


def test_nothing_is_logged_unless_asked_and_missing_wandb_says_how(monkeypatch):
    log_table(TABLE, {}, "probe", ["backbone", "method"])  # neither tracker: nothing imported, nothing written
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(DataError, match="pip install wandb"):
        log_table(TABLE, {}, "probe", ["backbone", "method"], wandb_project="proj")


def test_mlflow_metrics_per_row(tmp_path):
    log_table(TABLE, {"k": 1}, "probe", ["backbone", "method"], mlflow_uri=(tmp_path / "mlruns").as_uri())
    names = {p.relative_to(next((tmp_path / "mlruns").rglob("metrics"))).as_posix()
             for p in (tmp_path / "mlruns").rglob("metrics/**/*") if p.is_file()}
    assert names == {"a/global/recall_at_1", "a/local/recall_at_1"}
