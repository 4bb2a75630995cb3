"""Print the composed config as a rich tree (and save it next to the run's outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from flatsophia.security import redact

__all__ = ["print_config_tree"]

DEFAULT_ORDER = (
    "data",
    "model",
    "optimizer",
    "hessian",
    "scheduler",
    "module",
    "callbacks",
    "logger",
    "trainer",
    "paths",
    "extras",
)


@rank_zero_only
def print_config_tree(
    cfg: DictConfig,
    print_order: Sequence[str] = DEFAULT_ORDER,
    resolve: bool = False,
    save_to_file: bool = False,
) -> None:
    """Print ``cfg`` as a tree, groups in ``print_order`` first, then the rest (no ``hydra`` node).

    With ``save_to_file`` the tree is also written to ``<paths.output_dir>/config_tree.log``.
    """
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in print_order if k in cfg] + [k for k in cfg if k not in print_order and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else str(node)
        text = redact(text)  # values of *_KEY/*_TOKEN/... environment variables -> ***
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to_file:
        path = Path(cfg.paths.output_dir) / "config_tree.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            rich.print(tree, file=f)
