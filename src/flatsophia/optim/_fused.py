"""The fused CPU step (``fused=True``): a small C++ extension built on first use.

A ``torch.compile``d step spends ~0.5 ms per call on the ViT of ``scripts/benchmark.py`` outside
its kernel (dynamo's guards over ~265 tensors, AOTAutograd's and Inductor's wrappers, all with
cold caches after the kernel has streamed the optimizer state), ~17 % of the step. The fused
step is one C++ call that walks the tensor lists itself, like torch's own ``AdamW(fused=True)``,
on torch's intra-op threads (built with OpenMP, as torch is) and with software prefetch of its
four or five memory streams.

The extension (``_fused_cpu.cpp``) is compiled with ``torch.utils.cpp_extension.load`` the first
time a fused step runs (~25 s; cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). It needs a C++ compiler and ninja; where it cannot be built the
optimizers log the reason once and take their ``compile``/eager path. A compiler without OpenMP
gets a one-thread build, with a warning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_fused_cpu.cpp")
# Bump with any change of the source's interface (torch also rebuilds when the source changes).
_VERSION = 1

#: Vector-ISA flags per ``torch.backends.cpu.get_cpu_capability()``; the capability is part of the
#: extension's name, so a cache shared between machines (a cluster's home directory) never hands an
#: AVX-512 build to an AVX2 node.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}

#: ``at::parallel_for`` is parallel only in code compiled with OpenMP when torch's own intra-op backend
#: is OpenMP (the default of its Linux wheels); without the flag the kernel runs on one thread.
#: Linking with ``-fopenmp`` names ``libgomp.so.1``, which resolves to the copy torch has loaded.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []

_state: dict = {}


def _build(cap: str, openmp: bool):
    from torch.utils.cpp_extension import load

    omp = _OPENMP if openmp else []
    return load(
        name=f"flatsophia_fused_cpu_v{_VERSION}_{cap.lower()}" + ("_serial" if _OPENMP and not openmp else ""),
        sources=[str(_SOURCE)],
        # Without OpenMP proper, -fopenmp-simd still honours the kernels' ``omp simd`` loops.
        extra_cflags=["-O3", *(omp or ["-fopenmp-simd"]), *_ISA_FLAGS.get(cap, [])],
        extra_ldflags=list(omp),
        verbose=False,
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def extension():
    """The loaded extension module, building it on first use; ``None`` if it cannot be built
    (:func:`failure` says why). Where the OpenMP build fails (a compiler without OpenMP) it is built
    once more without, and warns: the fused step then runs on one thread."""
    if "module" in _state:
        return _state["module"]
    if "failure" in _state:
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        module = _build(cap, openmp=True)
    except Exception as err:  # no compiler, no ninja, no OpenMP, a read-only cache, ...
        why = _first_line(err)
        module = None
        if _OPENMP:
            try:
                module = _build(cap, openmp=False)
            except Exception as err2:
                why = f"{why}; without OpenMP: {_first_line(err2)}"
            else:
                log.warning("The fused CPU step was built without OpenMP (%s); it runs on one thread", why)
        if module is None:
            _state["failure"] = why
            log.warning("The fused CPU step is unavailable (%s); using the compile/eager step", why)
            return None
    _state["module"] = module
    return module


def failure() -> str | None:
    """Why the extension could not be built, or ``None`` (not tried yet, or built)."""
    return _state.get("failure")


class FusedStep:
    """One optimizer's use of the extension: runs a fused step, or says (once per reason) why not.

    ``run(name, *args)`` calls the extension's ``name`` (``sophia_h_step`` / ``sophia_g_step``), which
    checks every tensor before touching any and returns ``""`` after the step or the reason it
    could not take it; ``run`` returns whether the step was taken.
    """

    def __init__(self):
        self._warned: set[str] = set()

    def run(self, name: str, *args) -> bool:
        ext = extension()
        if ext is None:
            return False
        why = getattr(ext, name)(*args)
        if not why:
            return True
        if why not in self._warned:
            self._warned.add(why)
            log.warning("fused=True: %s; using the compile/eager step", why)
        return False
