"""A tiny fake multirun of ``src/train.py`` with round numbers, for the summary, study and notebook tests."""

from __future__ import annotations

from pathlib import Path

#: A tiny fake sweep (3 optimizers x 2 seeds) with round numbers, for the tests and the notebook:
#: per (optimizer, seed) the val/loss and val/acc at steps 9, 19, 29, 39 (epochs 0-3), test
#: loss/acc (step 40), sharpness top_eig/trace at steps 20 and 40 and time/step_ms at the four
#: training rows (steps 9, 19, 29, 39).
DEMO_RUNS: dict[tuple[str, int], dict[str, list[float]]] = {
    ("adamw", 0): dict(
        val_loss=[1.00, 0.80, 0.70, 0.75],
        val_acc=[0.50, 0.60, 0.70, 0.68],
        test=[0.72, 0.69],
        top_eig=[5.0, 8.0],
        trace=[50.0, 60.0],
        step_ms=[10.0, 10.0, 12.0, 12.0],
    ),
    ("adamw", 1): dict(
        val_loss=[1.10, 0.90, 0.78, 0.74],
        val_acc=[0.45, 0.55, 0.65, 0.66],
        test=[0.76, 0.66],
        top_eig=[6.0, 9.0],
        trace=[55.0, 70.0],
        step_ms=[11.0, 11.0, 13.0, 13.0],
    ),
    ("sophia_h", 0): dict(
        val_loss=[0.90, 0.70, 0.60, 0.62],
        val_acc=[0.55, 0.65, 0.75, 0.74],
        test=[0.63, 0.73],
        top_eig=[4.0, 6.0],
        trace=[40.0, 45.0],
        step_ms=[20.0] * 4,
    ),
    ("sophia_h", 1): dict(
        val_loss=[0.95, 0.72, 0.65, 0.61],
        val_acc=[0.52, 0.63, 0.72, 0.75],
        test=[0.64, 0.74],
        top_eig=[4.5, 7.0],
        trace=[42.0, 48.0],
        step_ms=[22.0] * 4,
    ),
    ("flat_sophia", 0): dict(
        val_loss=[0.85, 0.66, 0.58, 0.59],
        val_acc=[0.56, 0.67, 0.77, 0.76],
        test=[0.60, 0.76],
        top_eig=[3.0, 4.0],
        trace=[30.0, 35.0],
        step_ms=[24.0] * 4,
    ),
    ("flat_sophia", 1): dict(
        val_loss=[0.92, 0.80, 0.76, 0.80],
        val_acc=[0.53, 0.60, 0.66, 0.64],
        test=[0.79, 0.65],
        top_eig=[3.5, 5.0],
        trace=[33.0, 38.0],
        step_ms=[26.0] * 4,
    ),
}

_DEMO_TARGETS = {
    "adamw": "torch.optim.AdamW",
    "sophia_h": "flatsophia.optim.SophiaH",
    "flat_sophia": "flatsophia.optim.FlatSophia",
}
_DEMO_COLUMNS = [
    "epoch",
    "step",
    "train/loss_step",
    "time/step_ms",
    "val/loss",
    "val/acc",
    "sharpness/top_eig",
    "sharpness/trace",
    "test/loss",
    "test/acc",
]


def _demo_csv(run: dict[str, list[float]]) -> str:
    def row(**cells) -> str:
        return ",".join(
            "" if cells.get(c.replace("/", "_")) is None else repr(cells[c.replace("/", "_")]) for c in _DEMO_COLUMNS
        )

    lines = [",".join(_DEMO_COLUMNS)]
    for epoch in range(4):
        step = 10 * epoch + 9
        lines.append(
            row(epoch=epoch, step=step, train_loss_step=round(1.2 - 0.1 * epoch, 2), time_step_ms=run["step_ms"][epoch])
        )
        lines.append(row(epoch=epoch, step=step, val_loss=run["val_loss"][epoch], val_acc=run["val_acc"][epoch]))
        if epoch % 2 == 1:
            k = epoch // 2
            lines.append(row(step=step + 1, sharpness_top_eig=run["top_eig"][k], sharpness_trace=run["trace"][k]))
    lines.append(row(epoch=4, step=40, test_loss=run["test"][0], test_acc=run["test"][1]))
    return "\n".join(lines) + "\n"


def write_demo_sweep(root: Path | str, runs: dict | None = None) -> Path:
    """Write a fake multirun folder (``multirun.yaml``, job folders ``0/``, ``1/``, ... with
    ``.hydra/{config,hydra,overrides}.yaml`` and ``csv/version_0/metrics.csv``) of :data:`DEMO_RUNS`
    under ``root`` and return ``root``. Every job has the shared override ``model=mlp``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = DEMO_RUNS if runs is None else runs
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n  sweep:\n    dir: " + str(root) + "\n")
    for num, ((opt, seed), run) in enumerate(runs.items()):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        (job / "csv" / "version_0").mkdir(parents=True, exist_ok=True)
        target = _DEMO_TARGETS.get(opt, "torch.optim.SGD")
        (job / ".hydra" / "config.yaml").write_text(
            f"seed: {seed}\nmodule:\n  optimizer_name: ${{hydra:runtime.choices.optimizer}}\n"
            f"optimizer:\n  _target_: {target}\n  _partial_: true\n  lr: 0.001\n"
        )
        (job / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      optimizer: {opt}\n      model: mlp\n"
        )
        (job / ".hydra" / "overrides.yaml").write_text(f"- optimizer={opt}\n- seed={seed}\n- model=mlp\n")
        (job / "csv" / "version_0" / "metrics.csv").write_text(_demo_csv(run))
    return root
