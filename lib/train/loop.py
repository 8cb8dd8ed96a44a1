"""The training loop: P×K batches, AMP, gradient accumulation, margin phases, EMA, retrieval validation every
epoch, early stopping, atomic checkpoints and exact resume. The parts (model, loss, sampler, device settings,
logger) are built by the caller and passed in, so a test can hand in tiny ones.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lib.core.device import DeviceSettings, apply_settings
from lib.core.errors import DataError
from lib.retrieval.embed import extract_embeddings
from lib.retrieval.faiss_index import build_index, search
from lib.retrieval.ranking import evaluate_retrieval, resolve_val_protocol
from lib.train.checkpoint import (
    fp32_state_dict,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from lib.train.config import TrainConfig, settings_diff
from lib.train.distributed import StepRunner, TrainStep, World, seed_epoch
from lib.train.feature_cache import CachedFeatures, PooledFeatures, cache_features
from lib.train.losses import CombinedLoss, MarginSchedule, class_context_matrix, context_margins
from lib.train.mining import context_error, mining_weights
from lib.train.tracking import MetricsLog

SCHEDULERS = ("cosine_restarts", "plateau", "none")
BACKBONE_BN = ("auto", "frozen", "train")
CHECKPOINT_FILES = ("latest_model.pt", "best_model.pt", "metrics.csv")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the checkpoints on disk are from the last good epoch."""


def build_optimizer(model, criterion: CombinedLoss, cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW: the backbone at lr_backbone (with lr_decay < 1, stage by stage: the last stage at lr_backbone, each
    earlier one lr_decay times the next, since early stages hold generic features that should move least), and the
    head with the loss's own weights at lr_head. Frozen parameters get no gradient, so AdamW leaves them alone."""
    head = {"params": [*model.head_parameters(), *criterion.parameters()], "lr": cfg.lr_head, "name": "head"}
    if cfg.lr_decay == 1.0:
        groups = [{"params": model.backbone_parameters(), "lr": cfg.lr_backbone, "name": "backbone"}, head]
    else:
        last = len(model.stages) - 1
        groups = [{"params": [p for _, p in stage], "lr": cfg.lr_backbone * cfg.lr_decay ** (last - i),
                   "name": f"backbone.{i}"} for i, stage in enumerate(model.stages)] + [head]
    # fused AdamW: one kernel for all parameters on CUDA instead of a loop of small ones.
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.startswith("cuda"))


def build_scheduler(optimizer, cfg: TrainConfig):
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if cfg.scheduler == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.t0, T_mult=cfg.t_mult)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=cfg.plateau_patience,
                                                          factor=cfg.plateau_factor)
    return None


def _group_lr(optimizer, name: str) -> float:
    """The learning rate of a parameter group; for the backbone, its last stage's (the largest)."""
    return [g["lr"] for g in optimizer.param_groups if g["name"].split(".")[0] == name][-1]


def resolve_backbone_bn(setting: str, random_init: bool) -> str:
    """backbone_bn as it acts: 'auto' keeps pretrained BatchNorm statistics ('frozen') and trains a random init's."""
    if setting not in BACKBONE_BN:
        raise ValueError(f"backbone_bn={setting!r}; valid: {', '.join(BACKBONE_BN)}")
    return ("train" if random_init else "frozen") if setting == "auto" else setting


def trainable_stages(unfreeze) -> int | None:
    """`unfreeze` as EmbeddingModel.set_trainable_stages takes it: 'all' -> None, N -> N."""
    if str(unfreeze) == "all":
        return None
    if str(unfreeze).isdigit():
        return int(unfreeze)
    raise ValueError(f"unfreeze must be 'all' or a number of backbone stages >= 0, got {unfreeze!r}")


def validate(model, gallery_set: Dataset, query_set: Dataset, settings: DeviceSettings, batch_size: int,
             protocol: str = "gallery", prefix: str = "val_") -> dict:
    """Faiss retrieval: train images as the gallery and val images as queries, or val leave-one-out.

    Returns (metrics, top-1 hit per query)."""
    q = extract_embeddings(model, query_set, settings, batch_size)
    g = None if protocol == "loo" else extract_embeddings(model, gallery_set, settings, batch_size)
    return retrieval_metrics(g, gallery_set.targets.numpy(), q, query_set.targets.numpy(), protocol, prefix)


@torch.no_grad()
def validate_features(model, features: CachedFeatures, gallery_labels: np.ndarray, query_labels: np.ndarray,
                      device: str, protocol: str = "gallery", prefix: str = "val_") -> dict:
    """validate() on cached pooled features: the same numbers as the full forward pass while the backbone is frozen,
    without the backbone."""
    was_training = model.training
    model.eval()
    q = model.embed_features(features.queries.to(device)).cpu().numpy()
    g = None if protocol == "loo" else model.embed_features(features.gallery.to(device)).cpu().numpy()
    model.train(was_training)
    return retrieval_metrics(g, gallery_labels, q, query_labels, protocol, prefix)


def frozen_metrics(model, features: CachedFeatures | None, gallery_set: Dataset, query_set: Dataset,
                   settings: DeviceSettings, batch_size: int, protocol: str) -> dict:
    """The frozen backbone's own pooled features, without any head: the baseline every run is measured against
    (a random head blurs them; training that ends below them has not earned its keep)."""
    if features is None:
        pooled = PooledFeatures(model)
        q = extract_embeddings(pooled, query_set, settings, batch_size)
        g = None if protocol == "loo" else extract_embeddings(pooled, gallery_set, settings, batch_size)
    else:
        q, g = features.queries.numpy(), features.gallery.numpy()
    metrics, _ = retrieval_metrics(g, gallery_set.targets.numpy(), q, query_set.targets.numpy(), protocol,
                                   "frozen_val_")
    return metrics


def retrieval_metrics(g, gl, q, ql, protocol: str, prefix: str) -> tuple[dict, np.ndarray]:
    """(recall@1/5 and mAP under `prefix`, top-1 hit per query) of gallery and query embeddings. Under "loo" the
    queries are the gallery: g and gl are not read (the caller need not embed a gallery)."""
    if protocol == "loo":
        g, gl = q, ql
    m = evaluate_retrieval(g, gl, q, ql, ks=(1, 5), exclude_self=protocol == "loo")
    _, top1 = search(build_index(g), q, 1, exclude_self=protocol == "loo")
    hits = gl[top1[:, 0]] == ql
    return {f"{prefix}recall@1": m["recall@1"], f"{prefix}recall@5": m["recall@5"], f"{prefix}mAP": m["mAP"]}, hits


def _move_aside(run_dir: Path) -> Path | None:
    """fresh=True: earlier results are moved into run_dir/replaced-<time>/, never deleted."""
    old = [p for p in run_dir.iterdir() if p.is_file() and (p.name in CHECKPOINT_FILES or p.name.startswith("checkpoint_epoch_"))]
    if not old:
        return None
    backup = run_dir / f"replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    backup.mkdir()
    for p in old:
        shutil.move(str(p), backup / p.name)
    return backup


def fit(run_dir: str | os.PathLike, model, criterion: CombinedLoss, schedule: MarginSchedule, cfg: TrainConfig,
        settings: DeviceSettings, train_set: Dataset, batch_sampler, gallery_set: Dataset, query_set: Dataset,
        config: dict, fresh: bool = False, log: MetricsLog | None = None, progress: bool = True,
        stop_after_epoch: int | None = None, defaults: dict | None = None, batch_mix=None,
        world: World = World()) -> pd.DataFrame:
    """Train and validate; returns the per-epoch history (epoch 0 = the untrained model, for comparison).

    `batch_mix` (lib.data.transforms.batch_mix: mixup/cutmix, images and labels -> images and class weights) acts on
    the backbone phase's image batches; the head phase trains on cached features, which it cannot mix.
    Resumes from run_dir/latest_model.pt unless fresh=True; a checkpoint made with other settings is an error.
    `stop_after_epoch` ends the call after that epoch as if the process were killed (tests resume from it).
    `defaults` (the config of an all-default run) stands in for settings an older checkpoint does not record.
    Under DDP (`world`, lib.train.distributed) every rank calls fit with its share of the sampler; rank 0 alone
    validates, prints and writes, and every rank returns the same history.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log or MetricsLog(run_dir, enabled=world.main)
    say = print if world.main else _silent
    progress = progress and world.main
    latest = run_dir / "latest_model.pt"
    if fresh and world.main:
        backup = _move_aside(run_dir)
        if backup:
            say(f"fresh start: earlier checkpoints moved to {backup}")
    apply_settings(settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(settings.device, memory_format=memory_format)
    criterion.to(settings.device)
    optimizer = build_optimizer(model, criterion, cfg, settings.device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = settings.grad_scaler()
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    runner = StepRunner(TrainStep(model, criterion), world, settings.device)
    loader = DataLoader(train_set, batch_sampler=batch_sampler, num_workers=settings.num_workers,
                        pin_memory=settings.pin_memory, persistent_workers=settings.num_workers > 0,
                        prefetch_factor=4 if settings.num_workers > 0 else None)

    class_contexts, query_contexts = _contexts(cfg, train_set, query_set, batch_sampler)
    unfrozen = trainable_stages(cfg.unfreeze)
    model.frozen_bn = resolve_backbone_bn(cfg.backbone_bn, model.random_init) == "frozen"
    # the backbone phase follows the head phase; unfreeze=0 has none
    total_epochs = cfg.head_epochs + (cfg.epochs if unfrozen != 0 else 0)
    history: list[dict] = []
    start_epoch, best, since_best, run_id = 1, -math.inf, 0, None
    resumed = None if fresh else world.main_only(lambda: resume_checkpoint(run_dir))
    if resumed is not None:
        ckpt, source = resumed
        diff = settings_diff(config, ckpt["config"], defaults or {})
        if diff:
            raise DataError(f"{source} was trained with other settings ({', '.join(diff[:8])}); "
                            "use fresh=True (old files are kept in a replaced-* folder) or another run_dir")
        model.load_state_dict(ckpt["model"])
        criterion.load_state_dict(ckpt["criterion"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        if ckpt.get("context_weights"):
            batch_sampler.set_context_weights(ckpt["context_weights"])
        history, best, since_best, run_id = ckpt["history"], ckpt["best_metric"], ckpt["since_best"], ckpt.get("mlflow_run_id")
        start_epoch = ckpt["epoch"] + 1
        say(f"resumed from {source} at epoch {ckpt['epoch']} (best val recall@1 {best:.4f})")
    else:
        seed_everything(cfg.seed)
    log.start(config, run_dir.name, run_id)
    select_key = "ema_val_recall@1" if ema is not None else "val_recall@1"
    protocol = resolve_val_protocol(cfg.val_protocol, gallery_set.targets.numpy(), query_set.targets.numpy())
    say(f"validation: {'val leave-one-out' if protocol == 'loo' else 'train gallery, val queries'}")
    features = None
    if cfg.head_epochs > 0 and start_epoch <= cfg.head_epochs:
        model.eval()  # the features are the frozen backbone's in eval mode, as validation sees them
        # rank 0 computes and caches them; the other ranks then read its cache
        features = world.main_first(lambda: cache_features(model, train_set, gallery_set, query_set, cfg.cached_views,
                                                           settings, run_dir / "features", cfg.seed,
                                                           cfg.eval_batch_size, progress))
    gallery_labels, query_labels = gallery_set.targets.numpy(), query_set.targets.numpy()

    def state_at(epoch: int, context_weights=None) -> dict:
        return {"epoch": epoch, "config": config, "best_metric": best, "since_best": since_best,
                "history": history, "model": fp32_state_dict(model), "criterion": fp32_state_dict(criterion),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "ema": fp32_state_dict(ema) if ema is not None else None,
                "rng": rng_state(), "mlflow_run_id": log.mlflow_run_id, "class_to_idx": config.get("class_to_idx"),
                "context_weights": context_weights}

    if not history:
        if features is not None and cfg.head_init == "pca":
            model.init_head_pca(features.train.flatten(0, 1))
            if ema is not None:
                ema.set(model)
        metrics = None
        if world.main:
            if features is not None:
                metrics, _ = validate_features(model, features, gallery_labels, query_labels, settings.device,
                                               protocol)
            else:
                metrics, _ = validate(model, gallery_set, query_set, settings, cfg.eval_batch_size, protocol)
            metrics.update(frozen_metrics(model, features, gallery_set, query_set, settings, cfg.eval_batch_size,
                                          protocol))
        metrics = world.from_main(metrics)
        # epoch 0 is a candidate for best_model.pt: a run whose training only hurts keeps the untrained model
        best = metrics["val_recall@1"]
        row = {"epoch": 0, "phase": "untrained", **metrics, "best_val_recall@1": best, "best_epoch": 0}
        history.append(row)
        if world.main:
            save_checkpoint(run_dir / "best_model.pt", state_at(0))
        log.write(history)
        say(f"epoch 0 (untrained): val recall@1 {row['val_recall@1']:.4f} mAP {row['val_mAP']:.4f} | frozen "
            f"backbone features: recall@1 {row['frozen_val_recall@1']:.4f} mAP {row['frozen_val_mAP']:.4f}")

    try:
        for epoch in range(start_epoch, total_epochs + 1):
            in_head = epoch <= cfg.head_epochs
            if epoch == cfg.head_epochs + 1 and cfg.head_epochs:
                since_best = 0  # patience counts within the backbone phase: it can improve on what the head reached
            if not in_head and since_best >= cfg.early_stop_patience:
                say(f"early stop: no better val recall@1 for {since_best} epochs")
                break
            t0 = time.time()
            if world.active:
                seed_epoch(cfg.seed, epoch, world.rank)
            frozen = in_head or schedule.backbone_frozen_at(epoch - 1)
            model.set_trainable_stages(0 if frozen else unfrozen)
            if criterion.name == "arcface":  # the softmax head has no margin
                criterion.head.margin = schedule.margin_at(epoch - 1)
            margin = criterion.head.margin
            # Context margins only once there is a margin: the m=0 warm-up is plain softmax on purpose.
            margins_for = (None if class_contexts is None or margin == 0 else
                           lambda y: context_margins(y, class_contexts, base=margin, same_context=margin + cfg.context_margin))
            batch_sampler.set_epoch(epoch)
            desc = f"epoch {epoch}/{total_epochs}"
            if in_head:
                train_loss, n_images = _head_epoch(model, criterion, optimizer, ema, features, train_set.targets,
                                                   batch_sampler, epoch, settings, cfg, progress, desc, margins_for,
                                                   runner)
            else:
                train_loss, n_images = _train_epoch(model, criterion, optimizer, scaler, ema, loader, settings, cfg,
                                                    memory_format, progress, desc, margins_for, batch_mix, runner)
            # every rank trained on its share: the epoch's loss is their mean, its images their sum
            if world.active:
                shares = torch.tensor([train_loss, n_images], dtype=torch.float64, device=settings.device)
                train_loss, n_images = world.mean(shares).tolist()
                n_images = round(n_images * world.size)
            phase = "head" if in_head else "warmup" if frozen else "finetune"
            row = {"epoch": epoch, "phase": phase, "margin": criterion.head.margin,
                   "train_loss": train_loss, "lr_backbone": _group_lr(optimizer, "backbone"),
                   "lr_head": _group_lr(optimizer, "head"), "train_seconds": time.time() - t0,
                   "images_per_second": n_images / max(time.time() - t0, 1e-9)}

            def check(net, prefix="val_"):
                if in_head:
                    return validate_features(net, features, gallery_labels, query_labels, settings.device, protocol,
                                             prefix)
                return validate(net, gallery_set, query_set, settings, cfg.eval_batch_size, protocol, prefix)

            scores, context_weights = {}, None
            if world.main:
                scores, hits = check(model)
                if ema is not None:
                    scores.update(check(ema.module, "ema_val_")[0])
                if query_contexts is not None and epoch >= cfg.mining_warmup_epochs:
                    errors = context_error(query_contexts, hits)
                    context_weights = mining_weights(errors[errors.index.isin(batch_sampler.contexts)])
                    worst = errors.sort_values(ascending=False).head(3)
                    scores["worst_contexts"] = "; ".join(f"{c} {e:.2f}" for c, e in worst.items())
            # what rank 0 measured drives every rank's scheduler, early stop and hard-context weights alike
            scores, context_weights = world.from_main((scores, context_weights))
            row.update(scores)
            if context_weights is not None:
                batch_sampler.set_context_weights(context_weights)
            if scheduler is not None:
                scheduler.step(row["val_recall@1"]) if cfg.scheduler == "plateau" else scheduler.step()
            improved = better(row, history, select_key, best)
            best, since_best = (row[select_key], 0) if improved else (best, since_best + 1)
            row["best_val_recall@1"] = best
            row["best_epoch"] = epoch if improved else history[-1].get("best_epoch")
            history.append(row)

            if world.main:
                state = state_at(epoch, context_weights)
                save_checkpoint(latest, state)
                if improved:
                    # The weights that scored: the EMA's when EMA drives selection (the best EMA model is the one kept).
                    best_state = dict(state, model=fp32_state_dict(ema.module)) if ema is not None else state
                    save_checkpoint(run_dir / "best_model.pt", best_state)
                if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                    save_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pt", state)
            log.write(history)
            say(f"epoch {epoch}: loss {train_loss:.4f} val recall@1 {row['val_recall@1']:.4f} "
                f"recall@5 {row['val_recall@5']:.4f} mAP {row['val_mAP']:.4f}"
                + (f" | EMA recall@1 {row['ema_val_recall@1']:.4f}" if ema is not None else "")
                + f" | {row['train_seconds']:.0f} s")
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    finally:
        log.end()
    return pd.DataFrame(history)


def _silent(*args, **kwargs) -> None:
    """print on ranks other than 0: one voice per run."""


def better(row: dict, history: list[dict], select_key: str, best: float) -> bool:
    """Whether an epoch's val scores beat the best so far: a higher Recall@1, or the same Recall@1 and a higher mAP.
    Recall@1 on a few hundred val photos moves in steps of one photo, so ties are common; mAP, which weighs every
    rank, tells which of the tied models ranks the true matches higher."""
    if row[select_key] != best:
        return row[select_key] > best
    at_best = next((r for r in reversed(history) if r["epoch"] == history[-1].get("best_epoch")), {})
    map_key = select_key.replace("recall@1", "mAP")
    # epoch 0 scores the model alone: an EMA starts as a copy of it
    return row[map_key] > at_best.get(map_key, at_best.get("val_mAP", math.inf))


def _contexts(cfg: TrainConfig, train_set, query_set, batch_sampler):
    """(class x context matrix for context margins, val query contexts for mining), each None when not asked for."""
    wanted = cfg.context_margin > 0 or cfg.mining_warmup_epochs >= 0
    if not wanted:
        return None, None
    if "context" not in train_set.index.columns:
        raise DataError("context_margin / mining_warmup_epochs need a `context` column in the index "
                        "(notebook 01: metadata_csv with context_col)")
    class_contexts = None
    if cfg.context_margin > 0:
        class_contexts = class_context_matrix(train_set.targets.numpy(), train_set.index["context"].to_numpy(),
                                              int(train_set.targets.max()) + 1)
    query_contexts = None
    if cfg.mining_warmup_epochs >= 0:
        if not hasattr(batch_sampler, "set_context_weights"):
            raise ValueError("hard-context mining (mining_warmup_epochs >= 0) needs sampler='context_pk'")
        query_contexts = query_set.index["context"].to_numpy()
    return class_contexts, query_contexts


def _head_epoch(model, criterion, optimizer, ema, features: CachedFeatures, targets: torch.Tensor, batch_sampler,
                epoch: int, settings: DeviceSettings, cfg: TrainConfig, progress: bool, desc: str,
                margins_for=None, runner: StepRunner | None = None) -> tuple[float, int]:
    """One epoch of the head (and the loss's weights) on cached pooled features: the sampler's P x K batches, each
    photo in one of its cached views, drawn from a generator seeded by the epoch (exact resume, global RNG untouched);
    under DDP the views are drawn for the step's whole batch, so a rank's photos get the views one process would give.
    The head is one small matmul, so this runs in fp32 without autocast or gradient accumulation."""
    runner = runner or StepRunner(TrainStep(model, criterion), World(), settings.device)
    runner.prepare(pooled=True)
    model.train()
    criterion.train()
    views = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loss_sum = torch.zeros((), device=settings.device)
    n_images = n_steps = 0
    for batch, mine in tqdm(batch_sampler.steps(), total=len(batch_sampler), desc=desc, disable=not progress,
                            leave=False):
        idx = torch.as_tensor(batch[mine])
        view = torch.randint(len(features.train), (len(batch),), generator=views)[mine]
        x = features.train[view, idx].to(settings.device)
        y = targets[idx].to(settings.device)
        loss, _ = runner(x, y, margins_for(y) if margins_for else None, pooled=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.head_parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach()
        n_images, n_steps = n_images + len(idx), n_steps + 1
    mean = loss_sum.item() / max(n_steps, 1)
    if not math.isfinite(mean):
        raise TrainingDiverged(f"loss became {mean} in {desc} (head on cached features); stopped. The checkpoints in "
                               "the run folder are from the last good epoch. Lower lr_head or the margin.")
    return mean, n_images


def _train_epoch(model, criterion, optimizer, scaler, ema, loader, settings: DeviceSettings, cfg: TrainConfig,
                 memory_format, progress: bool, desc: str, margins_for=None, batch_mix=None,
                 runner: StepRunner | None = None) -> tuple[float, int]:
    runner = runner or StepRunner(TrainStep(model, criterion), World(), settings.device)
    runner.prepare(pooled=False)
    model.train()
    criterion.train()
    accum = settings.accum_steps
    n_steps = len(loader)
    # The running loss stays on the device: reading it every step would stall the GPU on a sync.
    loss_sum = torch.zeros((), device=settings.device)
    n_images = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for step, (x, y) in enumerate(bar):
        x = x.to(settings.device, non_blocking=True, memory_format=memory_format)
        y = y.to(settings.device, non_blocking=True)
        n_images += len(y)
        if batch_mix is not None:
            x, y = batch_mix(x, y)
        stepping = (step + 1) % accum == 0 or step + 1 == n_steps
        with runner.no_sync(accumulating=not stepping):
            loss, _ = runner(x, y, margins_for(y) if margins_for else None, autocast=settings.autocast)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
        if stepping:
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
        if (step + 1) % 50 == 0 or step + 1 == n_steps:
            mean = loss_sum.item() / (step + 1)
            if not math.isfinite(mean):
                raise TrainingDiverged(f"loss became {mean} at step {step + 1} of {desc}; stopped. The checkpoints in "
                                       "the run folder are from the last good epoch. Lower the learning rates or the "
                                       "margin, or try precision='fp32'.")
            bar.set_postfix(loss=f"{mean:.3f}")
    return loss_sum.item() / max(n_steps, 1), n_images
