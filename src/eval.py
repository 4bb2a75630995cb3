"""Evaluate a checkpoint on the test split (Hydra app; configs in ../conf/eval.yaml).

    python src/eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt

Pass the same ``data=``/``model=`` (and their overrides) as the training run used; the run's
``.hydra/config.yaml`` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from flatsophia.training import evaluate  # noqa: E402
from flatsophia.utils import extras  # noqa: E402
from flatsophia.validation import validate_config  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    validate_config(cfg)  # a refused choice is named before the config is printed (a misfit may not resolve)
    extras(cfg)
    metrics, _ = evaluate(cfg)
    if rank_zero_only.rank == 0:
        print(f"Test metrics: { {k: round(v, 4) for k, v in sorted(metrics.items())} }")


if __name__ == "__main__":
    main()
