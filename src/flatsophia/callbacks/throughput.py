"""What language-model runs are compared by: tokens seen, tokens per second, MFU and the time left."""

from __future__ import annotations

import collections
import logging
import time

import lightning as L
import torch
from torch import nn

__all__ = ["LMThroughput", "PEAK_TFLOPS", "model_flops_per_token", "peak_tflops"]

log = logging.getLogger(__name__)

#: Dense bf16 tensor-core peak per device in TFLOP/s (vendor data sheets), matched in this order against
#: ``torch.cuda.get_device_name()``. Other devices and precisions: pass ``peak_tflops``.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("V100", 125.0),  # fp16
)


def peak_tflops(device: torch.device) -> float | None:
    """The :data:`PEAK_TFLOPS` entry of a CUDA ``device``; ``None`` for other devices and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def model_flops_per_token(net: nn.Module, seq_len: int) -> tuple[float, str]:
    """Training FLOPs (forward + backward) per token of ``net`` and the formula used.

    The project's GPT (``wte``/``wpe`` embeddings and ``blocks``): ``6 N + 12 L d T`` (PaLM's
    appendix B, nanoGPT's ``estimate_mfu``): N parameters without the position table (and without
    the token table unless it is tied to the output head, which does compute), L blocks, width d
    (heads x head size), T = ``seq_len`` tokens of context (the attention scores and their use).
    Any other network: ``6 N`` with N its trainable parameters (no attention term). The Hessian
    estimates' extra passes are not model FLOPs and are not counted.
    """
    params = {id(p): p for p in net.parameters() if p.requires_grad}
    if all(hasattr(net, a) for a in ("wte", "wpe", "blocks", "lm_head")):
        skip = {id(net.wpe.weight)}
        if net.lm_head.weight is not net.wte.weight:
            skip.add(id(net.wte.weight))
        n = sum(p.numel() for k, p in params.items() if k not in skip)
        layers, width = len(net.blocks), net.wte.embedding_dim
        return 6.0 * n + 12.0 * layers * width * seq_len, "6N+12LdT"
    return 6.0 * sum(p.numel() for p in params.values()), "6N"


class LMThroughput(L.Callback):
    """Log tokens seen, tokens/s, MFU and the estimated time left, for token (language-model) data.

    Active when the datamodule's ``kind`` is ``"tokens"`` (``data=charlm``, ``tinyshakespeare``, ...);
    a no-op for other data. Logged every optimizer step (written every ``trainer.log_every_n_steps``):

    - ``tokens``: tokens seen (predicted) so far, summed over ranks and micro-batches: per batch the
      targets' count times the number of ranks (ranks get equal batches). Carried by checkpoints, so a
      resumed run continues the count. ``val/tokens`` is logged with every validation, so ``val/loss``
      can be plotted against tokens; under W&B every ``train/``, ``val/`` and ``perf/`` metric is
      plotted against them (``define_metric``).
    - ``perf/tokens_per_s``: over the last ``window`` optimizer steps (validation excluded).
    - ``perf/mfu``: ``model_flops_per_token * tokens_per_s / (peak * ranks)``, with the FLOPs from
      :func:`model_flops_per_token` and the peak from ``peak_tflops`` (per device) or, when null, the
      GPU's dense bf16 peak (:data:`PEAK_TFLOPS`); not logged where no peak is known (CPU).
    - ``perf/eta_h`` (also in the progress bar): optimizer steps left (``trainer.max_steps``, or the
      schedule's length) times the recent seconds per step; validation not included.

    Args:
        peak_tflops: peak TFLOP/s of one device; null: looked up for the GPU.
        window: optimizer steps the rates are averaged over.
    """

    def __init__(self, peak_tflops: float | None = None, window: int = 20):
        if peak_tflops is not None and (isinstance(peak_tflops, bool) or not float(peak_tflops) > 0):
            raise ValueError(f"Invalid peak_tflops: {peak_tflops!r} (expected a positive number, or null)")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"Invalid window: {window!r} (expected an integer >= 1)")
        self.peak_tflops = None if peak_tflops is None else float(peak_tflops)
        self.window = window
        self.tokens = 0
        self.active = False
        self._marks: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=window + 1)
        self._flops: float | None = None
        self._peak: float | None = None
        self._total: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = getattr(trainer.datamodule, "kind", None) == "tokens"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._peak = self.peak_tflops or peak_tflops(pl_module.device)
        self._marks.clear()
        self._total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if self._total is None and hasattr(pl_module, "_total_optimizer_steps"):
            self._total = pl_module._total_optimizer_steps()  # the schedule's length
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                run = logger.experiment
                run.define_metric("tokens")
                run.define_metric("val/tokens")
                for prefix in ("train/*", "perf/*", "optim/*", "time/*"):
                    run.define_metric(prefix, step_metric="tokens")
                run.define_metric("val/*", step_metric="val/tokens")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # Counted before the batch's end hooks, so that a checkpoint saved by any of them includes it.
        if self.active:
            self.tokens += batch[1].numel() * trainer.world_size

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.active:
            return
        if getattr(pl_module, "_micro", 0):  # inside an accumulation window
            return
        now = time.perf_counter()
        self._marks.append((now, self.tokens, trainer.global_step))
        pl_module.log("tokens", float(self.tokens), on_step=True, on_epoch=False)
        if len(self._marks) < 2:
            return
        (t0, n0, s0), (t1, n1, s1) = self._marks[0], self._marks[-1]
        if t1 <= t0 or s1 <= s0:
            return
        rate = (n1 - n0) / (t1 - t0)
        pl_module.log("perf/tokens_per_s", rate, on_step=True, on_epoch=False)
        if self._peak:
            if self._flops is None:
                self._flops, formula = model_flops_per_token(getattr(pl_module, "net", pl_module), batch[1].shape[-1])
                log.info(
                    "MFU: %.4g FLOPs per token (%s), peak %.4g TFLOP/s per device", self._flops, formula, self._peak
                )
            mfu = self._flops * rate / (self._peak * 1e12 * trainer.world_size)
            pl_module.log("perf/mfu", mfu, on_step=True, on_epoch=False)
        if self._total:
            left = max(self._total - trainer.global_step, 0) * (t1 - t0) / (s1 - s0)
            pl_module.log("perf/eta_h", left / 3600.0, on_step=True, on_epoch=False, prog_bar=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()  # the rates measure training only

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and not trainer.sanity_checking:
            pl_module.log("val/tokens", float(self.tokens))

    def state_dict(self) -> dict:
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict["tokens"])
