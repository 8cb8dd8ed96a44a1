# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (photo-retrieval)
#     language: python
#     name: photo-retrieval
# ---

# %% [markdown]
# # 02 · Train the embedding (backbone + GeM + ArcFace)
#
# Head phase (`head_epochs`): the frozen backbone embeds every train photo once per view (`cached_views`: the
# photo, then seeded draws of the augmentation) and the embedding head, started at the features' principal
# directions, trains with ArcFace on those cached features: many epochs in seconds, because the backbone's
# forward and backward passes are the whole cost of an epoch on a CPU. Backbone phase (`epochs`): the last
# `unfreeze` stages of the backbone train too ("all": every stage; 0: none, the run ends after the head), each
# earlier stage `lr_decay` times slower, BatchNorm keeping its pretrained statistics (`backbone_bn`). Validation
# every epoch is retrieval: train photos are the gallery, val photos the queries (or val leave-one-out for
# individuals training never saw). Epoch 0 is the untrained model and a candidate for `best_model.pt`, beside the
# frozen backbone's own features: a run never ends below them.
# Re-running resumes from `run_dir/latest_model.pt` unless `fresh=True`.
#
# `nproc` > 1 trains with DDP: the notebook starts `torchrun` on `lib.train.launch` with the config written to
# `run_dir/run_config.json` and streams its output here; each process takes `p` classes of every step, so a step
# holds `p x images_per_class x nproc` photos. `papermill 02_train.ipynb out.ipynb -p nproc 4`, or without the notebook:
# `torchrun --nproc_per_node 4 -m lib.train.launch --config runs/photos/run_config.json`.
#
# `loss="ce"` trains the classifier baseline instead (jaguar notes v02, marmoset pipeline): a softmax classifier on
# the same embedding, label-smoothed cross-entropy, through the same phases (head on cached features, frozen-backbone
# `warmup_epochs`, then the backbone; `ema_decay` as for ArcFace). Its embedding is validated and evaluated by the
# same retrieval, and notebook 03 adds its softmax probabilities' classification metrics. `mixup` / `cutmix` mix
# images, so they act in the backbone phase only (the head phase trains on cached features), and need `loss="ce"`.
#
# Defaults are the recipe for real photos on a CPU (packaged ImageNet EfficientNet-Lite0, no network; see the
# recipe benchmark in docs/benchmarks.md). The demo runner (`run_all.py`) trains a tiny random-init model instead.
# On a GPU box with hub access: `backbone="tf_efficientnetv2_l"`, `pretrained="hub"`, `img_size=480`.

# %% tags=["parameters"]
run_dir = "runs/photos"         # checkpoints, metrics.csv; resumed when it holds latest_model.pt
fresh = False                   # True: start over; earlier checkpoints move to run_dir/replaced-<time>/
data_dir = "data/photos"        # your photos, as notebook 01 indexed them
splits_dir = "splits"           # written by notebook 01
cache_dir = ""                  # resize cache from notebook 01 ("": read the originals)
fold = -1                       # -1: train/val split; k: fold k of notebook 01's K folds
# model
backbone = "tf_efficientnet_lite0"  # any timm name
pretrained = "auto"             # auto: packaged weights where they exist | "hub" | "lite0-imagenet" | a file | "": none
embed_dim = 512
pooling = "gem"                 # gem | avg
img_size = 320                  # px, square; 224 halves the cost of a backbone epoch
resize = "squash"               # squash: whole photo to a square | pad: whole photo, bars | crop: centre crop
augment = "light"               # none | light | strong
aug_backend = "torchvision"     # torchvision | albumentations: the same presets, drawn by the other library
hflip = True                    # False where left and right flanks differ
# loss and phases
loss = "arcface"                # arcface | ce: softmax classifier baseline (s scales its input; no margin)
label_smoothing = 0.1           # ce only
mixup = 0.0                     # ce only, backbone phase: Beta alpha of mixup (e.g. 0.1 as the marmoset runs); 0: off
cutmix = 0.0                    # ce only, backbone phase: Beta alpha of cutmix (e.g. 1.0); 0: off
s = 30.0                        # ArcFace scale: 64 for many classes, ~30-48 for few
warmup_epochs = 1               # softmax epochs (margin warmup_margin) before the full margin
warmup_margin = 0.0
margin = 0.3                    # full margin (0.5 for many photos per class; lower for few classes or unstable runs)
ramp_epochs = 0                 # > 0: raise the margin linearly over this many epochs
k_subcenters = 1                # > 1: Sub-center ArcFace
triplet_weight = 0.0            # auxiliary BatchHard triplet term
ms_weight = 0.0                 # auxiliary Multi-Similarity term
# head phase on cached features
head_epochs = 30                # 0: no head phase (the backbone phase starts from a random head)
cached_views = 4                # per train photo: the photo itself, then seeded augmentations
head_init = "pca"               # pca: start at the features' principal directions | random
# backbone phase
epochs = 10                     # after the head phase
unfreeze = "1"                  # last N backbone stages that train; "all"; "0": stop after the head phase
lr_decay = 0.5                  # each earlier stage learns this times slower than the next
backbone_bn = "auto"            # frozen: BatchNorm keeps its pretrained statistics | train | auto: frozen if pretrained
lr_backbone = 1e-4
lr_head = 1e-3
weight_decay = 1e-4
scheduler = "cosine_restarts"   # cosine_restarts | plateau | none
early_stop_patience = 10
ema_decay = 0.0                 # e.g. 0.999 on long runs; 0: off
p = 16                          # classes per batch
images_per_class = 4            # photos of each class in a P x K batch (was `k`)
sampler = "pk"                  # pk | context_pk
batches_per_epoch = 0           # 0: about one pass over the train images
seed = 0
# device (auto = chosen from the GPU: precision, workers, accumulation; set to override)
device = "auto"
precision = "auto"              # auto | bf16 | fp16 | fp32
num_workers = -1
accum_steps = 0
# several processes (DDP, launched through torchrun; see docs/gpus.md)
nproc = 1                       # processes on this machine: > 1 trains with one per GPU (on a CPU: gloo, for tests)
nnodes = 1                      # machines; > 1: run this notebook on each, node_rank 0 on master_addr
node_rank = 0
master_addr = "127.0.0.1"
master_port = 29500
sync_bn = False                 # nproc > 1 on CUDA: BatchNorm statistics over every process's images
mlflow_uri = "file:./mlruns"    # "": no MLflow
figures_dir = "figures"

# %%
from pathlib import Path

from lib.core.start import work_from_repo_root

work_from_repo_root()  # relative paths from the repository root, lib from its checkout

from lib.core.notebook_params import renamed_parameters

renamed_parameters(globals(), "02_train")  # the old name, for one release

from lib.analysis.figures import plot_training_curves, save
from lib.train.config import build_config, config_parameters
from lib.train.launch import train
from lib.train.run import run_summary

# every parameter above that is a run-config knob (lib.train.config), by its name
config = build_config(**config_parameters(globals()))

# %%
history = train(run_dir, config, nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                master_port=master_port, fresh=fresh, mlflow_uri=mlflow_uri)
history

# %% [markdown]
# ## Curves
# The dotted line is the untrained model (epoch 0), the dashed one the frozen backbone's own features: a run that ends
# below them has failed, whatever its loss did; `best_model.pt` is then epoch 0.

# %%
fig = plot_training_curves(history)
save(fig, Path(figures_dir) / f"02_training_curves_{Path(run_dir).name}.png")

# %%
print(run_summary(history))
