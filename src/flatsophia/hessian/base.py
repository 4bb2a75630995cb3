"""Shared pieces of the Hessian estimators: seeded per-device-type generators, a factory, and the
global-RNG and buffer guards an extra forward pass needs to leave no trace."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

import torch

log = logging.getLogger(__name__)

_warned_math_sdpa = False


@contextlib.contextmanager
def math_attention(enabled: bool = True):
    """Force the math kernel of ``F.scaled_dot_product_attention`` inside the block.

    The flash and memory-efficient kernels have no double backward, so a Hessian-vector product
    through attention needs the math kernel. Logged once per process.
    """
    global _warned_math_sdpa
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not _warned_math_sdpa:
        log.info("Hessian refresh: using the math kernel of scaled_dot_product_attention (needs double backward)")
        _warned_math_sdpa = True
    with sdpa_kernel(SDPBackend.MATH):
        yield


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Indices of the CUDA devices ``tensors`` live on (whose generators a forward may draw from)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def capture_rng_state(devices: Iterable[int] = ()) -> dict:
    """The global RNG state: CPU, and each CUDA device in ``devices`` (ByteTensors)."""
    return {"cpu": torch.get_rng_state(), "cuda": {i: torch.cuda.get_rng_state(i) for i in devices}}


def set_rng_state(state: dict) -> None:
    """Restore a :func:`capture_rng_state` result."""
    torch.set_rng_state(state["cpu"])
    for i, cuda_state in state["cuda"].items():
        torch.cuda.set_rng_state(cuda_state, i)


@contextlib.contextmanager
def replayed_rng(state: dict):
    """Run the block with the global RNG at ``state`` (the same dropout masks as the pass that
    started there), then put the stream back where it was: the block draws nothing from it."""
    with torch.random.fork_rng(devices=list(state["cuda"])):
        set_rng_state(state)
        yield


@contextlib.contextmanager
def preserved_buffers(module: torch.nn.Module | None):
    """Restore every buffer of ``module`` in place after the block, bit for bit (BatchNorm's running
    statistics and batch counter: a training-mode forward updates them)."""
    saved = [(b, b.clone()) for b in module.buffers()] if module is not None else []
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


@contextlib.contextmanager
def grads_set_aside(params: Sequence[torch.Tensor], module: torch.nn.Module | None = None):
    """Take the gradient of a backward run inside the block out of ``.grad``, leaving ``.grad`` as it was.

    On entry every ``.grad`` of ``params`` (and of the other parameters of ``module``) is set aside
    and cleared; on exit the yielded list is filled with each of ``params``' new ``.grad`` (``None``
    where the block left none) and the old gradients are put back. This is how an estimate is taken
    from an ordinary ``backward()``: under FSDP2, whose reduce-scatter (the average over ranks) runs
    only in ``backward()``, ``torch.autograd.grad`` cannot reach the sharded parameters. Enter it
    before the forward: FSDP2 registers the unsharded parameters on its root module between a
    forward and its backward.
    """
    params = list(params)
    ids = {id(p) for p in params}
    others = [p for p in module.parameters() if id(p) not in ids] if module is not None else []
    everything = params + others
    saved = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    taken: list[torch.Tensor | None] = []
    try:
        yield taken
    finally:
        taken.extend(p.grad for p in params)
        for p, g in zip(everything, saved):
            p.grad = g


class HessianEstimator:
    """Base class: owns one seeded ``torch.Generator`` per device type, saved in ``state_dict()``.

    Generators are keyed by device *type* (``"cpu"``, ``"cuda"``, ...), not by device index: the
    process of rank ``r`` draws on ``cuda:r``, and a checkpoint written by rank 0 resumes every rank.
    A generator is created on the first device of its type that asks for one (draws for another
    index of that type use the same stream). States load on any machine: see :meth:`load_state_dict`.

    Subclasses implement ``__call__(forward, loss_fn, params) -> list[Tensor | None]``.
    """

    #: registry name, matching ``OptimizerSpec.hessian``
    name = "base"

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer)")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        #: loaded states of device types not used yet (set on first use, re-emitted until then)
        self._pending: dict[str, torch.Tensor] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator for ``device``'s type, created on first use: from a loaded state of that
        type if :meth:`load_state_dict` had one, else seeded with ``seed``."""
        device = torch.device(device)
        if device.type not in self._generators:
            g = torch.Generator(device=device)
            pending = self._pending.pop(device.type, None)
            if pending is None:
                g.manual_seed(self.seed)
            else:
                g.set_state(pending)
            self._generators[device.type] = g
        return self._generators[device.type]

    def state_dict(self) -> dict:
        """``{"name", "seed", "generators": {device type: ByteTensor state}}`` (CPU tensors only)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "generators": {**self._pending, **{k: g.get_state() for k, g in self._generators.items()}},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`, on any machine.

        Each generator state applies to its device type, whatever the index it was saved under
        (checkpoints that keyed them by device, ``"cuda:0"``, load too; of several indices of one
        type the lowest is kept). A state is set when its device type is first used; until then,
        e.g. a ``"cuda"`` state loaded on a machine without CUDA, it is kept as it is and written
        back by :meth:`state_dict`, so the checkpoint round-trips. A device type without a saved
        state starts from ``seed``: resuming a CPU run on a GPU continues with a fresh CUDA stream.
        Every state is checked before anything changes (``ValueError`` naming the bad entry).
        """
        if state.get("name") != self.name:
            raise ValueError(f"Cannot load a {state.get('name')!r} estimator state into a {self.name!r} estimator")
        seed, generators = state.get("seed"), state.get("generators")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid estimator state: seed={seed!r} (expected an integer)")
        if not isinstance(generators, dict):
            raise ValueError(f"Invalid estimator state: generators={generators!r} (expected a dict of device -> state)")
        by_type: dict[str, tuple[int, torch.Tensor]] = {}
        for key, rng_state in generators.items():
            device = _parse_device(key)
            if not (isinstance(rng_state, torch.Tensor) and rng_state.dtype == torch.uint8 and rng_state.ndim == 1):
                raise ValueError(
                    f"Invalid estimator state for device {key!r}: expected a 1-D uint8 tensor "
                    f"(Generator.get_state()), got {getattr(rng_state, 'dtype', type(rng_state).__name__)}"
                )
            rng_state = rng_state.detach().cpu()
            if device.type == "cpu":
                try:
                    torch.Generator().set_state(rng_state)
                except RuntimeError as err:
                    raise ValueError(f"Invalid estimator state for device {key!r}: {err}") from err
            index = device.index if device.index is not None else -1
            if device.type not in by_type or index < by_type[device.type][0]:
                by_type[device.type] = (index, rng_state)
        self.seed = seed
        self._generators = {}
        self._pending = {kind: rng_state.clone() for kind, (_, rng_state) in by_type.items()}

    def __call__(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        raise NotImplementedError


def _parse_device(key) -> torch.device:
    try:
        return torch.device(key)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"Invalid estimator state: generator key {key!r} is not a device (expected e.g. 'cpu', 'cuda')"
        ) from err


def build_estimator(name: str, **kwargs) -> HessianEstimator | None:
    """``"hutchinson"`` -> :class:`Hutchinson`, ``"gnb"`` -> :class:`GaussNewtonBartlett`, ``"none"`` -> None."""
    from .gnb import GaussNewtonBartlett
    from .hutchinson import Hutchinson

    table = {"hutchinson": Hutchinson, "gnb": GaussNewtonBartlett}
    if name == "none":
        return None
    if name not in table:
        raise ValueError(f"Unknown Hessian estimator {name!r}; choose one of: none, gnb, hutchinson")
    return table[name](**kwargs)
