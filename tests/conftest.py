"""Shared fixtures: Hydra configs composed in-process from conf/, with per-test output folders.

``make_cfg(overrides, config_name="train")`` composes ``conf/<config_name>.yaml`` like
``python src/<config_name>.py <overrides>`` would, with ``paths.*`` pointing at ``tmp_path`` (outputs)
and a per-session data folder (the MNIST-1D cache is generated once per test process), config
printing off and the Hydra runtime set so ``${hydra:...}`` interpolations resolve.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _missing_requirements(extras: tuple[str, ...]) -> list[str]:
    """The requirements of flatsophia's ``extras`` (read from its installed metadata, i.e. pyproject;
    an extra that names ``flatsophia[other]`` includes ``other``'s) that are absent or at a version the
    requirement excludes."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(r) for r in metadata.requires("flatsophia") or []]
    except metadata.PackageNotFoundError:
        return ["flatsophia itself"]

    def wanted(req: Requirement, among: set[str]) -> bool:
        return req.marker is not None and any(req.marker.evaluate({"extra": extra}) for extra in among)

    wanted_extras, grown = set(extras), True
    while grown:
        included = {e for r in requirements if r.name == "flatsophia" and wanted(r, wanted_extras) for e in r.extras}
        grown = not included <= wanted_extras
        wanted_extras |= included
    missing = []
    for req in requirements:
        if req.name == "flatsophia" or not wanted(req, wanted_extras):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req.name}{req.specifier}")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req.name}{req.specifier} (found {version})")
    return missing


ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONF_DIR = ROOT / "conf"

#: The optimizer library's tests (folders and files under tests/): they need torch and the `test-lib`
#: extra only. ``pytest --library`` (``make test-lib``) collects only these, in an environment without
#: the template's extras, on the oldest torch that pyproject allows.
LIBRARY_TESTS = ("optim", "hessian", "test_packaging.py")
#: Files in those folders that use the template's stack: timm's ViT and the template's GPT, the toy
#: problem's plots (matplotlib), the precision study and the Lightning module's hvp rule. The full
#: suite runs them.
TEMPLATE_USERS = ("hessian/test_finite_difference.py", "hessian/test_precision.py", "optim/test_toy2d.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--library",
        action="store_true",
        help="run only the optimizer library's tests (conftest.LIBRARY_TESTS); they need torch and "
        "flatsophia's test-lib extra, not the template's extras",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A missing package is an error here, not a skipped test: the full suite needs everything
    # `make test` installs, the library's tests what `make test-lib` installs.
    library = config.getoption("library")
    if _missing := _missing_requirements(("test-lib",) if library else ("template", "test")):
        raise pytest.UsageError(
            f"missing: {', '.join(_missing)}. "
            + (
                "The library's tests need flatsophia's test-lib extra: run `make test-lib`, or "
                "pip install -e '.[test-lib]'."
                if library
                else "The tests need flatsophia's template and test extras: run `make test` (it installs "
                "them), or pip install -e '.[template,test]' (`pytest --library` runs the library's tests "
                "without them)."
            )
        )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``--library``, everything outside :data:`LIBRARY_TESTS` and in :data:`TEMPLATE_USERS`."""
    if not config.getoption("library") or collection_path == TESTS:
        return None
    try:
        rel = collection_path.relative_to(TESTS).as_posix()
    except ValueError:
        return None
    inside = any(rel == t or rel.startswith(t + "/") for t in LIBRARY_TESTS)
    return None if inside and rel not in TEMPLATE_USERS else True


#: Overrides that make any training run tiny: few small batches, no loggers or callbacks.
TINY = [
    "logger=none",
    "callbacks=none",
    "data.batch_size=16",
    "data.eval_batch_size=100",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "scheduler.warmup_steps=1",
]

#: The default data and model (MNIST-1D, ViT1D), made small.
TINY_DEFAULT = [
    "data.num_samples=1000",
    "data.n_val=200",
    "model.embed_dim=16",
    "model.depth=1",
    "model.num_heads=2",
]


def script_command(
    script: str, *overrides: str, log_dir: Path, data_dir: Path, **env
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of :func:`run_script` (for starting several at once)."""
    cmd = [
        sys.executable,
        f"src/{script}.py",
        *overrides,
        "extras.print_config=false",
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
    ]
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **env}
    return cmd, {k: v for k, v in merged.items() if v is not None}


def run_script(
    script: str, *overrides: str, log_dir: Path, data_dir: Path, check: bool = True, timeout: int = 300, **env
) -> subprocess.CompletedProcess:
    """``python src/<script>.py <overrides>`` from the project root, as a user runs it: one thread, no
    config printing, outputs under ``log_dir``; ``env`` adds variables (``None`` removes one). With
    ``check``, a non-zero exit fails the test with the output's tail."""
    cmd, merged = script_command(script, *overrides, log_dir=log_dir, data_dir=data_dir, **env)
    result = subprocess.run(cmd, cwd=ROOT, env=merged, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def compose_config(config_name: str, overrides: Sequence[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` and test paths (Hydra runtime set)."""
    # Imported here: keeps collection light, and the library's tests (`--library`) run without Hydra.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from flatsophia.utils.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.data_dir = str(data_dir)
        cfg.extras.print_config = False
        cfg.extras.enforce_tags = False
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Data/cache folder shared by the tests of one process (``FLATSOPHIA_TEST_DATA_DIR`` to reuse one)."""
    given = os.environ.get("FLATSOPHIA_TEST_DATA_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """Factory: ``make_cfg(overrides=(), config_name="train", tiny=True)``.

    ``tiny=True`` adds :data:`TINY` and :data:`TINY_DEFAULT`; ``tiny="run"`` only :data:`TINY` (for
    other data/models); ``tiny=False`` nothing.
    """

    def make(overrides: Sequence[str] = (), config_name: str = "train", tiny: bool | str = True) -> DictConfig:
        extra = {True: TINY + TINY_DEFAULT, "run": TINY, False: []}[tiny]
        return compose_config(config_name, [*extra, *overrides], tmp_path, data_dir)

    return make


@pytest.fixture
def cfg_train(make_cfg) -> DictConfig:
    """``conf/train.yaml`` made tiny (see :data:`TINY`, :data:`TINY_DEFAULT`)."""
    return make_cfg()


@pytest.fixture
def cfg_eval(make_cfg) -> DictConfig:
    """``conf/eval.yaml`` with the tiny settings of :data:`TINY` and :data:`TINY_DEFAULT` (``ckpt_path`` unset)."""
    return make_cfg(config_name="eval")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny-tensor tests (much faster than two on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: Documents of the token-file fixture: numbered slices of Python's standard library source (offline).
def token_documents(n: int = 40, size: int = 3000) -> list[str]:
    from flatsophia.data.charlm_datamodule import stdlib_corpus

    text = stdlib_corpus(n * size).decode("utf-8", errors="replace")
    return [f"# document {i}\n{text[i * size : (i + 1) * size]}" for i in range(n)]


@pytest.fixture(scope="session")
def token_files(tmp_path_factory) -> Path:
    """A token folder (train.bin, val.bin, meta.json) written by the bytes tokenizer: ``data.data_dir``
    is its parent, ``data.dataset`` its name (``bytes``), ``data.num_classes=256``."""
    from flatsophia.data.prepare_tokens import prepare

    folder = tmp_path_factory.mktemp("tokens") / "bytes"
    prepare(token_documents(), folder, "bytes", val_fraction=0.25, split_seed=0, log=lambda _: None)
    return folder


#: Overrides that put data=tokens on the fixture's files with a tiny GPT (add data.data_dir=<parent>).
TINY_TOKENS = [
    "data.dataset=bytes",
    "data.num_classes=256",
    "data.block_size=16",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.eval_iters=2",
    "data.num_workers=0",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
]
