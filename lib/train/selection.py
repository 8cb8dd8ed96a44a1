"""Which epoch is best, and when to stop: model selection on val retrieval scores."""
from __future__ import annotations

import math
from dataclasses import dataclass


def improves(row: dict, history: list[dict], select_key: str, best: float) -> bool:
    """Whether an epoch's val scores beat the best so far: a higher Recall@1, or the same Recall@1 and a higher mAP.
    Recall@1 on a few hundred val photos moves in steps of one photo, so ties are common; mAP, which weighs every
    rank, tells which of the tied models ranks the true matches higher."""
    if row[select_key] != best:
        return row[select_key] > best
    at_best = next((r for r in reversed(history) if r["epoch"] == history[-1].get("best_epoch")), {})
    map_key = select_key.replace("recall@1", "mAP")
    # epoch 0 scores the model alone: an EMA starts as a copy of it
    return row[map_key] > at_best.get(map_key, at_best.get("val_mAP", math.inf))


@dataclass
class Selection:
    """The best val Recall@1 so far (of the EMA model's when EMA drives selection) and the epochs since it."""
    select_key: str = "val_recall@1"
    best: float = -math.inf
    since_best: int = 0

    def record(self, row: dict, history: list[dict]) -> bool:
        """Score the epoch `row` against `history` (the epochs before it), fill its best_* columns; True if best."""
        improved = improves(row, history, self.select_key, self.best)
        self.best, self.since_best = (row[self.select_key], 0) if improved else (self.best, self.since_best + 1)
        row["best_val_recall@1"] = self.best
        row["best_epoch"] = row["epoch"] if improved else history[-1].get("best_epoch")
        return improved
