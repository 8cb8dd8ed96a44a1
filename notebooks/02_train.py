# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (photo-retrieval)
#     language: python
#     name: photo-retrieval
# ---

# %% [markdown]
# # 02 · Train the embedding (backbone + GeM + ArcFace)
#
# Phase 1 (`warmup_epochs`): backbone frozen, ArcFace with `warmup_margin` (0 = softmax on scaled cosines);
# phase 2: everything trains with the full `margin`. Validation every epoch is retrieval: train photos are the
# gallery, val photos the queries. Epoch 0 is the untrained model, so every curve shows what training added.
# Re-running resumes from `run_dir/latest_model.pt` unless `fresh=True`.
#
# Defaults are the synthetic demo (a tiny random-init model at 64 px, minutes on a CPU). For real photos:
# `backbone="tf_efficientnet_lite0"`, `pretrained="lite0-imagenet"` (ImageNet weights from a pip package, no
# network), `img_size=224`; on a GPU box with hub access `backbone="tf_efficientnetv2_l"`, `pretrained="hub"`,
# `img_size=480`, `embed_dim=512`.

# %% tags=["parameters"]
run_dir = "runs/demo"           # checkpoints, metrics.csv; resumed when it holds latest_model.pt
fresh = False                   # True: start over; earlier checkpoints move to run_dir/replaced-<time>/
data_dir = "data/demo"
splits_dir = "splits"           # written by notebook 01
cache_dir = ""                  # resize cache from notebook 01 ("": read the originals)
fold = -1                       # -1: train/val split; k: fold k of notebook 01's K folds
# model
backbone = "resnet10t"          # any timm name
pretrained = ""                 # "" none | "auto" packaged if the backbone has them | "hub" | "lite0-imagenet" | a file
embed_dim = 128
pooling = "gem"                 # gem | avg
img_size = 64
augment = "light"               # none | light | strong
hflip = True                    # False where left and right flanks differ
# loss and phases
s = 30.0                        # ArcFace scale: 64 for many classes, ~30-48 for few
warmup_epochs = 1               # phase 1 length (5 on real photos)
warmup_margin = 0.0
margin = 0.3                    # phase 2 margin (0.5 on real photos; lower for few classes or unstable runs)
ramp_epochs = 0                 # > 0: raise the margin linearly over this many phase-2 epochs
k_subcenters = 1                # > 1: Sub-center ArcFace
triplet_weight = 0.0            # auxiliary BatchHard triplet term
ms_weight = 0.0                 # auxiliary Multi-Similarity term
# optimisation
epochs = 6
lr_backbone = 1e-3              # random-init demo; use ~1e-4 for pretrained backbones
lr_head = 3e-3
weight_decay = 1e-4
scheduler = "cosine_restarts"   # cosine_restarts | plateau | none
early_stop_patience = 10
ema_decay = 0.0                 # e.g. 0.999 on long runs; 0: off
p = 6                           # classes per batch
k = 4                           # images per class
sampler = "pk"                  # pk | context_pk
batches_per_epoch = 0           # 0: about one pass over the train images
seed = 0
# device (auto = chosen from the GPU: precision, workers, accumulation; set to override)
device = "auto"
precision = "auto"              # auto | bf16 | fp16 | fp32
num_workers = -1
accum_steps = 0
mlflow_uri = "file:./mlruns"    # "": no MLflow
figures_dir = "figures"

# %%
import os
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "lib" / "__init__.py").exists())
os.chdir(ROOT)

from lib.analysis.figures import plot_training_curves, save
from lib.train.config import build_config
from lib.train.run import train_run

config = build_config(
    data_dir=data_dir, splits_dir=splits_dir, cache_dir=cache_dir, fold=fold,
    backbone=backbone, pretrained=pretrained, embed_dim=embed_dim, pooling=pooling,
    img_size=img_size, augment=augment, hflip=hflip,
    s=s, k_subcenters=k_subcenters, triplet_weight=triplet_weight, ms_weight=ms_weight,
    warmup_epochs=warmup_epochs, warmup_margin=warmup_margin, margin=margin, ramp_epochs=ramp_epochs,
    epochs=epochs, lr_backbone=lr_backbone, lr_head=lr_head, weight_decay=weight_decay, scheduler=scheduler,
    early_stop_patience=early_stop_patience, ema_decay=ema_decay, seed=seed,
    p=p, k=k, sampler=sampler, batches_per_epoch=batches_per_epoch,
    device=device, precision=precision, num_workers=num_workers, accum_steps=accum_steps,
)

# %%
history = train_run(run_dir, config, fresh=fresh, mlflow_uri=mlflow_uri)
history

# %% [markdown]
# ## Curves
# The dotted line is the untrained model (epoch 0): a run that ends below it has failed, whatever its loss did.

# %%
fig = plot_training_curves(history)
save(fig, Path(figures_dir) / f"02_training_curves_{Path(run_dir).name}.png")

# %%
untrained, best = history["val_recall@1"].iloc[0], history["val_recall@1"].max()
print(f"val recall@1: untrained {untrained:.3f} -> best {best:.3f} ({'better' if best > untrained else 'NOT better'})")
