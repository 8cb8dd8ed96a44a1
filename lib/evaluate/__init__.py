"""Stage 4, evaluate: evaluate a trained run on a split, the evaluation record, the results table, predict new
photos."""
