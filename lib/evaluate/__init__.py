"""Stage 4, evaluate: evaluate a trained run on a split, the evaluation record, the results table, thresholds chosen
out of sample, predict new photos, enrol photos into the gallery."""
