"""Stage 1, data: the dataset table (folder or CSV), image checks, splits, resize cache, Dataset, transforms,
samplers, masks."""
