"""Train a model with one of the project's optimizers (Hydra app; configs in ../conf).

    python src/train.py                                    # defaults: conf/train.yaml
    python src/train.py optimizer=sophia_g model=mlp       # switch groups
    python src/train.py -m optimizer=adamw,flat_sophia seed=0,1
    python src/train.py experiment=flat_sophia_overfit

Returns the value of ``optimized_metric`` for hyperparameter sweepers.
"""

from __future__ import annotations

import os
from pathlib import Path

# The repository root, for ${paths.root_dir} (data/ and logs/ live there), wherever we are run from.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from flatsophia.training import train  # noqa: E402
from flatsophia.utils import extras, get_metric_value  # noqa: E402
from flatsophia.validation import validate_config  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    validate_config(cfg)  # a refused choice is named before the config is printed (a misfit may not resolve)
    extras(cfg)
    metrics, _ = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    if rank_zero_only.rank == 0:
        print(f"Final metrics: {shown}")
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
