"""End-to-end training through the Hydra configs and flatsophia.training (in-process where possible)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_DEFAULT, run_script
from flatsophia.optim import OPTIMIZERS
from flatsophia.training import evaluate, train
from flatsophia.utils import get_metric_value, metric_sweeper

#: One small member of each model family, on data it fits.
FAMILIES = {
    "vit1d": [
        "data=mnist1d",
        "data.num_samples=1000",
        "data.n_val=200",
        "model=vit1d",
        "model.embed_dim=16",
        "model.depth=1",
        "model.num_heads=2",
    ],
    "mlp": ["data=mnist1d", "data.num_samples=1000", "data.n_val=200", "model=mlp", "model.hidden_sizes=[16]"],
    "vit": ["data=digits", "model=vit", "model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
    "resnet": ["data=digits", "model=resnet", "model.name=resnet18"],
    "gpt": [
        "data=charlm",
        "data.max_chars=20000",
        "data.block_size=32",
        "model=gpt",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
    ],
}


def finite(metrics: dict, *keys: str) -> None:
    for key in keys:
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[key]), f"{key} = {metrics[key]}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fast_dev_run(make_cfg, optimizer, family):
    cfg = make_cfg([f"optimizer={optimizer}", *FAMILIES[family], "debug=fast_dev_run"], tiny="run")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert type(objects["model"].optimizers().optimizer) is OPTIMIZERS[optimizer].cls
    finite(metrics, "val/loss", "test/loss")
    finite(metrics, "val/ppl" if family == "gpt" else "val/acc")


def test_default_config_trains_and_learns(make_cfg):
    cfg = make_cfg(["trainer.max_epochs=3", "++trainer.limit_train_batches=20", "optimizer=adamw", "optimizer.lr=3e-3"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 60
    finite(metrics, "train/loss_epoch", "val/loss", "val/acc", "val/loss_best", "test/loss", "test/acc")
    assert metrics["val/loss"] < math.log(10)  # better than chance


def test_trainer_clipping_and_accumulation_rejected(make_cfg):
    with pytest.raises(ValueError, match=r"module\.grad_clip"):
        train(make_cfg(["+trainer.gradient_clip_val=0.5"]))
    with pytest.raises(ValueError, match=r"module\.accumulate"):
        train(make_cfg(["+trainer.accumulate_grad_batches=4"]))


def test_hessian_choice_must_fit_the_optimizer(make_cfg):
    _, objects = train(make_cfg(["optimizer=sophia_g", "hessian=gnb", "test=false"]))
    assert objects["model"].estimator_name == "gnb"
    with pytest.raises(ValueError, match="does not fit"):
        train(make_cfg(["optimizer=flat_sophia", "hessian=gnb"]))


def test_module_accumulate(make_cfg):
    cfg = make_cfg(["module.accumulate=3", "++trainer.limit_train_batches=6", "optimizer=sophia_g"])
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2


def checkpoint_run(make_cfg, *overrides):
    """Tiny run with the default callbacks (checkpointing) and the CSV logger."""
    return make_cfg(
        ["callbacks=default", "logger=csv", "callbacks.progress_bar=null", "callbacks.model_summary=null", *overrides]
    )


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_from_checkpoint(make_cfg, tmp_path, optimizer):
    """Every optimizer's checkpoint is tensors and plain data (weights_only=True), and resumes."""
    cfg = checkpoint_run(make_cfg, "trainer.max_epochs=1", f"optimizer={optimizer}")
    _, objects = train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    last = folder / "last.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]  # best + last
    assert objects["trainer"].global_step == 3
    saved = torch.load(last, weights_only=True)  # the module's extra entry and the hparams included
    assert (saved["epoch"], saved["global_step"]) == (0, 3)
    assert saved["flatsophia"]["optimizer_name"] == saved["hyper_parameters"]["optimizer_name"] == optimizer
    opt_state = objects["model"].optimizers().optimizer.state_dict()
    cfg = checkpoint_run(make_cfg, "trainer.max_epochs=2", f"ckpt_path={last}", f"optimizer={optimizer}")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6  # 3 restored + 3 new optimizer steps
    assert objects["trainer"].current_epoch == 2  # the second epoch ran, the first was not repeated
    resumed = objects["model"].optimizers().optimizer.state_dict()
    assert len(resumed["state"]) == len(opt_state["state"])
    assert torch.load(last, weights_only=False)["global_step"] == 6  # last.ckpt follows the run
    best = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and best[0] in ("epoch_000.ckpt", "epoch_001.ckpt")  # save_top_k=1
    finite(metrics, "val/loss", "test/loss")


def test_one_epoch_with_a_double_validation_loop(make_cfg):
    """val_check_interval=0.5: two validations inside the epoch, each logged."""
    cfg = checkpoint_run(make_cfg, "++trainer.limit_train_batches=4", "trainer.val_check_interval=0.5")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4
    rows = list(csv.DictReader(open(next(Path(cfg.paths.output_dir).glob("csv/*/metrics.csv")))))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [1, 3]  # after batches 2 and 4
    finite(metrics, "val/loss", "val/acc", "test/loss")


@pytest.mark.parametrize("stop", ["trainer.max_steps=5", "trainer.max_time=00:00:00:01"])
def test_a_run_stopped_inside_an_epoch_validates_and_checkpoints(make_cfg, stop):
    """max_steps / max_time inside the first epoch: the run validates before it ends (val/*, checkpoints)."""
    over = ["++trainer.limit_train_batches=1.0", "trainer.max_epochs=50", "data.batch_size=2", stop]
    if "max_time" in stop:
        over += ["optimizer=sophia_h", "hessian.every_k=1"]  # slow steps: 1 s passes inside the first epoch
    cfg = checkpoint_run(make_cfg, *over)
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert 0 < trainer.global_step < 400  # inside the first epoch: 800 signals / 2 per batch = 400 steps
    if "max_steps" in stop:
        assert trainer.global_step == 5
    finite(metrics, "val/loss", "val/acc", "val/loss_best", "test/loss")
    assert get_metric_value(metrics, cfg.optimized_metric) == metrics["val/loss"]  # what src/train.py returns
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]


def test_optimized_metric_is_needed_only_where_a_sweeper_optimises_it(make_cfg, caplog):
    make_cfg()  # a single run (Hydra's RUN mode): a missing metric is a warning
    assert metric_sweeper() is None
    assert get_metric_value({"val/loss": 1.0}, "val/acc") is None
    assert "optimized_metric=val/acc was not logged (logged: val/loss)" in caplog.text
    make_cfg(["hparams_search=optuna"])  # a multirun whose sweeper optimises the returned metric
    assert metric_sweeper() == "OptunaSweeper"
    with pytest.raises(ValueError, match=r"The OptunaSweeper sweeper optimises optimized_metric=val/acc, which"):
        get_metric_value({"val/loss": 1.0}, "val/acc")
    assert get_metric_value({"val/acc": 0.5}, "val/acc") == 0.5


def test_resume_missing_checkpoint(make_cfg):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        train(make_cfg(["ckpt_path=/no/such/file.ckpt"]))


def test_train_then_eval_agree(make_cfg):
    cfg = checkpoint_run(make_cfg, "trainer.max_epochs=2", "optimizer=sophia_h")
    train_metrics, objects = train(cfg)
    best = objects["trainer"].checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    cfg_eval = make_cfg([f"ckpt_path={best}"], config_name="eval")
    eval_metrics, eval_objects = evaluate(cfg_eval)
    assert eval_objects["model"].optimizer_name == "sophia_h"  # taken from the checkpoint
    for key in ("test/loss", "test/acc"):
        assert eval_metrics[key] == pytest.approx(train_metrics[key], abs=1e-6)


def test_eval_errors(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="ckpt_path is required"):
        evaluate(make_cfg(config_name="eval"))
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        evaluate(make_cfg(["ckpt_path=/no/such/file.ckpt"], config_name="eval"))
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        evaluate(make_cfg([f"ckpt_path={bad}"], config_name="eval"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        evaluate(make_cfg([f"ckpt_path={plain}"], config_name="eval"))


@pytest.mark.slow
def test_ddp_sim(make_cfg):
    """Two CPU processes (ddp_spawn); FlatSophia's Hessian estimates are averaged across ranks."""
    cfg = checkpoint_run(make_cfg, "trainer=ddp_sim", "optimizer=flat_sophia", "hessian.every_k=1", "test=false")
    metrics, objects = train(cfg)
    assert objects["trainer"].world_size == 2
    finite(metrics, "val/loss", "val/acc")
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # each rank: 3 batches, 3 optimizer steps
    refresher = saved["flatsophia"]["refresher"]
    assert (refresher["refreshes"], refresher["skipped"]) == (3, 0)  # a refresh at every step, none skipped


@pytest.mark.slow
def test_wandb_offline_run_is_finished(make_cfg, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics, _ = train(make_cfg(["logger=wandb"]))
    assert wandb.run is None  # finished, so a following multirun job starts its own run
    finite(metrics, "val/loss")


@pytest.mark.slow
def test_eval_cli(make_cfg, data_dir):
    """src/eval.py on a checkpoint written by an in-process training run."""
    cfg = checkpoint_run(make_cfg, "test=false")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    result = run_script("eval", f"ckpt_path={last}", *TINY_DEFAULT, log_dir=cfg.paths.output_dir, data_dir=data_dir)
    assert "Test metrics:" in result.stdout and "test/acc" in result.stdout


@pytest.mark.slow
def test_multirun_joblib(tmp_path, data_dir):
    """The CLI: a 2-job multirun with the joblib launcher writes one sweep folder with both jobs."""
    over = ["-m", "hydra/launcher=joblib", "optimizer=adamw,sophia_g", "debug=fast_dev_run", *TINY_DEFAULT]
    result = run_script("train", *over, log_dir=tmp_path, data_dir=data_dir)
    sweeps = list((tmp_path / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert result.stdout.count("Final metrics:") == 2


def test_test_final_scores_the_last_weights_and_test_the_best(make_cfg):
    cfg = checkpoint_run(make_cfg, "trainer.max_epochs=3", "optimizer=sophia_h", "test_final=true")
    metrics, objects = train(cfg)
    finite(metrics, "test/loss", "test/acc", "test_final/loss", "test_final/acc")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    best = objects["trainer"].checkpoint_callback.best_model_path
    assert torch.load(last, weights_only=True)["global_step"] == 9  # the end, not the best epoch
    # test_final/* = the weights at the end of training (last.ckpt); test/* = the best checkpoint
    for ckpt, prefix in ((last, "test_final"), (best, "test")):
        scores, _ = evaluate(make_cfg([f"ckpt_path={ckpt}"], config_name="eval"))
        assert scores["test/loss"] == pytest.approx(metrics[f"{prefix}/loss"], abs=1e-6), prefix
    csv = next(Path(cfg.paths.output_dir).glob("**/metrics.csv")).read_text()
    assert "test_final/loss" in csv.splitlines()[0]
