"""Safe by default (issue #19): untrusted checkpoints never run code, saves never lose the last good
state, downloads are verified, secrets stay out of what a run writes."""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import io
import logging
import os
import pickle
import runpy
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra

import flatsophia.security as security
from conftest import TINY, TINY_DEFAULT, run_script
from flatsophia.data.tinyshakespeare_datamodule import TINYSHAKESPEARE_SHA256, TinyShakespeareDataModule
from flatsophia.security import (
    REDACTED,
    AtomicCheckpointIO,
    UntrustedCheckpointError,
    install_log_redaction,
    redact,
    secret_values,
)
from flatsophia.training import _build_common, evaluate, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTING = ["callbacks=default", "logger=csv", "callbacks.progress_bar=null", "callbacks.model_summary=null"]


#: How the payload's callable is named in the pickle (``io.open``).
PAYLOAD_GLOBAL = f"{open.__module__}.{open.__qualname__}"


class Evil:
    """Unpickling it calls ``open(marker, "w")``, creating the marker file: it stands for any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(tmp_path: Path, base: dict | None = None) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would create a marker file: (its path, the marker's path)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({**(base or {"state_dict": {}}), "x": Evil(marker)}, path)
    return path, marker


def trained_checkpoint(make_cfg, *overrides: str) -> Path:
    cfg = make_cfg([*CHECKPOINTING, "test=false", *overrides])
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture
def weights_only_seen(monkeypatch) -> list[tuple[str, object]]:
    """Records the ``weights_only`` that Trainer.fit / Trainer.test receive."""
    seen = []
    for name in ("fit", "test"):
        real = getattr(L.Trainer, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("weights_only")))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(L.Trainer, name, spy)
    return seen


# ------------------------------------------------------------------------------------ checkpoints
def test_crafted_checkpoint_is_refused_by_the_python_api(make_cfg, tmp_path):
    path, marker = crafted(tmp_path)
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and PAYLOAD_GLOBAL in message and "ckpt_trusted=true" in message
    with pytest.raises(UntrustedCheckpointError, match=PAYLOAD_GLOBAL):
        evaluate(make_cfg([f"ckpt_path={path}"], config_name="eval"))
    with pytest.raises(UntrustedCheckpointError, match=PAYLOAD_GLOBAL):
        train(make_cfg([f"ckpt_path={path}"]))
    with pytest.raises(ValueError, match="ckpt_trusted"):
        evaluate(make_cfg([f"ckpt_path={path}", "ckpt_trusted=yes"], config_name="eval"))
    assert not marker.exists()


def test_trusted_checkpoint_is_loaded_with_a_warning(make_cfg, tmp_path, caplog, weights_only_seen):
    last = trained_checkpoint(make_cfg)
    weights_only_seen.clear()
    path, marker = crafted(tmp_path, torch.load(last, weights_only=True))
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()

    with caplog.at_level(logging.WARNING, logger="flatsophia.security"):
        metrics, _ = evaluate(make_cfg([f"ckpt_path={path}", "ckpt_trusted=true"], config_name="eval"))
    assert marker.exists() and "test/loss" in metrics
    assert any("ckpt_trusted=true" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert weights_only_seen == [("test", False)]

    marker.unlink()
    weights_only_seen.clear()
    cfg = make_cfg([*CHECKPOINTING, "trainer.max_epochs=2", f"ckpt_path={path}", "ckpt_trusted=true"])
    _, objects = train(cfg)
    assert marker.exists() and objects["trainer"].global_step == 6
    assert weights_only_seen == [("fit", False), ("test", False)]
    # What the resumed run wrote is plain again.
    resumed = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert "x" not in resumed and resumed["global_step"] == 6


def test_lightning_loads_with_weights_only(make_cfg, weights_only_seen):
    last = trained_checkpoint(make_cfg)
    weights_only_seen.clear()
    train(make_cfg([*CHECKPOINTING, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert weights_only_seen == [("fit", True), ("test", True)]  # the resume and the best checkpoint
    weights_only_seen.clear()
    evaluate(make_cfg([f"ckpt_path={last}"], config_name="eval"))
    assert weights_only_seen == [("test", True)]


def test_optimizer_kwargs_are_saved_plain(make_cfg):
    """Without `_convert_: all` Hydra would hand the factory ListConfig betas, which weights_only refuses."""
    last = trained_checkpoint(make_cfg, "~optimizer._convert_", "optimizer=adamw")
    saved = torch.load(last, weights_only=True)
    assert saved["hyper_parameters"]["optimizer_kwargs"]["betas"] == [0.9, 0.999]


@pytest.mark.slow
def test_cli_refuses_crafted_checkpoint(tmp_path, data_dir):
    """src/eval.py and a resume through src/train.py: refused with the global named; the payload never runs."""
    path, marker = crafted(tmp_path)
    for script in ("eval", "train"):
        result = run_script(script, f"ckpt_path={path}", log_dir=tmp_path / "logs", data_dir=data_dir, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert "UntrustedCheckpointError" in output and PAYLOAD_GLOBAL in output and "ckpt_trusted=true" in output
        assert not marker.exists(), script


# ------------------------------------------------------------------------------------ atomic saves
def half_then_fail(monkeypatch) -> list[str]:
    """Make torch.save write half of the bytes, then fail as a full disk would; returns the files written to."""
    real = torch.save
    written_to = []

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        written_to.append(getattr(f, "name", "<memory>"))
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", save)
    return written_to


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    before = path.read_bytes()
    written_to = half_then_fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    # Streamed to a file next to the target (a rename within one file system is atomic), not to memory
    # or the system temp folder as Lightning's TorchCheckpointIO does.
    assert len(written_to) == 1 and Path(written_to[0]).parent == tmp_path
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone


def test_save_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(security.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(security.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "a.ckpt")
    assert calls == ["fsync", "replace", "fsync"]  # the file, the rename, the folder (persists the rename)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_failed_save_during_training_keeps_last_ckpt(make_cfg, monkeypatch):
    """The resumed run saves into the same folder; its failing saves leave the files of the first run."""
    last = trained_checkpoint(make_cfg)
    before = {p.name: p.read_bytes() for p in last.parent.iterdir()}
    assert sorted(before) == ["epoch_000.ckpt", "last.ckpt"]
    half_then_fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        train(make_cfg([*CHECKPOINTING, "trainer.max_epochs=2", f"ckpt_path={last}", "test=false"]))
    assert {p.name: p.read_bytes() for p in last.parent.iterdir()} == before  # and no temporary file left
    assert torch.load(last, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import io, os, signal, torch
        import flatsophia.security as security
        io_ = security.AtomicCheckpointIO()
        io_.save_checkpoint({{"state_dict": {{"w": torch.ones(100_000)}}, "global_step": 1}}, {str(path)!r})
        real = torch.save
        def save(obj, f):
            buf = io.BytesIO()
            real(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        security.torch.save = save
        io_.save_checkpoint({{"state_dict": {{"w": torch.zeros(100_000)}}, "global_step": 2}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-3000:]
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 1 and torch.equal(saved["state_dict"]["w"], torch.ones(100_000))


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml")))
def test_every_trainer_config_saves_atomically(make_cfg, option):
    """Each conf/trainer option (on the CPU here) gets the atomic CheckpointIO; it survives pickling (ddp_spawn)."""
    cfg = make_cfg([f"trainer={option}", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    trainer = _build_common(cfg)["trainer"]
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert type(pickle.loads(pickle.dumps(trainer.strategy.checkpoint_io))) is AtomicCheckpointIO


# ------------------------------------------------------------------------------------ downloads
@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over ``tmp_path/www``: (that folder, its base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200


def test_download_with_the_expected_hash_is_kept(tmp_path, file_server):
    www, base = file_server
    (www / "input.txt").write_bytes(TEXT)
    dm = TinyShakespeareDataModule(
        data_dir=str(tmp_path / "data"), download=True, url=f"{base}/input.txt", sha256=hashlib.sha256(TEXT).hexdigest()
    )
    dm.prepare_data()
    assert dm.path.read_bytes() == TEXT
    assert [p.name for p in dm.path.parent.iterdir()] == ["input.txt"]


def test_download_with_another_hash_is_refused(tmp_path, file_server):
    www, base = file_server
    (www / "input.txt").write_bytes(TEXT)
    url = f"{base}/input.txt"
    dm = TinyShakespeareDataModule(data_dir=str(tmp_path / "data"), download=True, url=url)  # the pinned hash
    with pytest.raises(ValueError, match="failed verification") as err:
        dm.prepare_data()
    message = str(err.value)
    assert TINYSHAKESPEARE_SHA256 in message and hashlib.sha256(TEXT).hexdigest() in message
    assert url in message and str(dm.path) in message
    assert not list(dm.path.parent.iterdir())  # neither input.txt nor the partial download


def test_pinned_hash_is_the_configured_one():
    raw = yaml.safe_load((ROOT / "conf" / "data" / "tinyshakespeare.yaml").read_text())
    assert raw["sha256"] == TINYSHAKESPEARE_SHA256
    with pytest.raises(ValueError, match="data.sha256"):
        TinyShakespeareDataModule(sha256="not-a-hash")


# ------------------------------------------------------------------------------------ secrets
SECRET_ENV = {"WANDB_API_KEY": "wandb-fake-9f8e7d6c5b4a", "FLATSOPHIA_TEST_TOKEN": "tok-fake-1a2b3c4d5e6f"}


def test_secret_values_and_redact(monkeypatch):
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SOME_PASSWORD", "abc")  # too short to redact: it would match ordinary text
    monkeypatch.setenv("NOT_SECRET_PATH", "tok-fake-but-not-named-a-secret")
    values = secret_values()
    assert set(SECRET_ENV.values()) <= set(values) and "abc" not in values
    obj = {"a": [f"x{SECRET_ENV['WANDB_API_KEY']}y", (1, SECRET_ENV["FLATSOPHIA_TEST_TOKEN"])], "t": torch.ones(1)}
    out = redact(obj)
    assert out["a"] == [f"x{REDACTED}y", (1, REDACTED)] and out["t"] is obj["t"]
    assert redact("tok-fake-but-not-named-a-secret") == "tok-fake-but-not-named-a-secret"


def test_log_filter_redacts_messages_and_tracebacks(tmp_path, monkeypatch):
    secret = SECRET_ENV["FLATSOPHIA_TEST_TOKEN"]
    monkeypatch.setenv("FLATSOPHIA_TEST_TOKEN", secret)
    logger = logging.getLogger("flatsophia.test_security")
    handler = logging.FileHandler(tmp_path / "run.log")
    logger.addHandler(handler)
    try:
        install_log_redaction(logger)
        logger.warning("token is %s", secret)
        try:
            raise ValueError(f"bad url https://{secret}@example.org")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert secret not in text and text.count(REDACTED) == 2 and "Traceback" in text


def test_checkpoint_hyperparameters_are_redacted(tmp_path, monkeypatch):
    secret = SECRET_ENV["WANDB_API_KEY"]
    monkeypatch.setenv("WANDB_API_KEY", secret)
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "hyper_parameters": {"note": secret}}, path)
    assert secret.encode() not in path.read_bytes()
    assert torch.load(path, weights_only=True)["hyper_parameters"]["note"] == REDACTED


@pytest.fixture
def hydra_app(monkeypatch):
    """Run ``src/<script>.py`` in this process as ``python src/<script>.py <args>`` would (Hydra and all)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))

    def run(script: str, *args: str) -> None:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [str(ROOT / "src" / f"{script}.py"), *args])
        runpy.run_path(str(ROOT / "src" / f"{script}.py"), run_name="__main__")

    yield run
    GlobalHydra.instance().clear()
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def test_secrets_stay_out_of_everything_a_run_writes(tmp_path, data_dir, monkeypatch, capsys, hydra_app):
    """A secret reaches the config through ${oc.env:...} and through command-line overrides; no file of
    the run (.hydra/*.yaml, hparams.yaml, CSV, checkpoints, config tree, log) holds it afterwards."""
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    literal = SECRET_ENV["FLATSOPHIA_TEST_TOKEN"]
    out = tmp_path / "logs"
    hydra_app(
        "train",
        *TINY,
        *TINY_DEFAULT,
        *CHECKPOINTING,
        "+notes.from_env=${oc.env:WANDB_API_KEY}",
        f"+notes.from_cli={literal}",
        f"tags=[dev,{literal}]",
        f"paths.log_dir={out}",
        f"paths.data_dir={data_dir}",
    )
    printed = capsys.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "hparams.yaml", "metrics.csv", "last.ckpt"} <= names
    assert {"train.log", "config_tree.log"} <= names
    for p in files:
        data = p.read_bytes()
        for value in SECRET_ENV.values():
            assert value.encode() not in data, f"{value} in {p}"
    for value in SECRET_ENV.values():
        assert value not in printed.out + printed.err
    # The values did reach the config (and were replaced), rather than being dropped on the way.
    for name in ("hparams.yaml", "overrides.yaml", "config_tree.log"):
        assert REDACTED in next(p for p in files if p.name == name).read_text(), name
    hparams = yaml.safe_load(next(p for p in files if p.name == "hparams.yaml").read_text())
    assert hparams["notes"] == {"from_env": REDACTED, "from_cli": REDACTED}


def test_redacted_argv_is_restored_after_the_block(monkeypatch):
    secret = SECRET_ENV["FLATSOPHIA_TEST_TOKEN"]
    monkeypatch.setenv("FLATSOPHIA_TEST_TOKEN", secret)
    argv = ["train.py", f"+notes.x={secret}", "seed=1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(RuntimeError), security.redacted_argv():
        assert sys.argv == ["train.py", f"+notes.x={REDACTED}", "seed=1"]
        raise RuntimeError
    assert sys.argv is argv and argv[1] == f"+notes.x={secret}"


def test_wandb_run_records_the_command_line_without_secrets(tmp_path, data_dir, monkeypatch, hydra_app):
    """W&B (offline) stores ``sys.argv`` in the run's metadata: the secret is replaced there too."""
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    literal = SECRET_ENV["FLATSOPHIA_TEST_TOKEN"]
    out = tmp_path / "logs"
    hydra_app(
        "train",
        *TINY,
        *TINY_DEFAULT,
        "logger=wandb",
        f"+notes.from_cli={literal}",
        f"paths.log_dir={out}",
        f"paths.data_dir={data_dir}",
    )
    runs = list(out.rglob("run-*.wandb"))
    assert len(runs) == 1
    # The arguments were recorded (with the value replaced), not left out.
    assert f"+notes.from_cli={REDACTED}".encode() in runs[0].read_bytes()
    for p in (p for p in out.rglob("*") if p.is_file()):
        data = p.read_bytes()
        for value in SECRET_ENV.values():
            assert value.encode() not in data, f"{value} in {p}"
