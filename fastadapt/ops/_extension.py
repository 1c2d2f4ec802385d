"""Loading of the compiled extension, with a pure-PyTorch fallback when it is missing.

Importing fastadapt never fails: if ``fastadapt._C`` is absent, fails to load (an ABI mismatch with
the installed torch, say) or is disabled with ``FASTADAPT_DISABLE_EXTENSION=1``, every op runs its
pure-PyTorch reference and one warning names the reason.
"""
from __future__ import annotations

import os
import warnings

import torch

from fastadapt._version import __version__

_C = None
_load_error: str | None = None
_warned = False

if os.environ.get("FASTADAPT_DISABLE_EXTENSION", "0") not in ("", "0"):
    _load_error = "disabled by FASTADAPT_DISABLE_EXTENSION=1"
else:
    try:
        from fastadapt import _C  # noqa: F811  (loading it registers the fastadapt:: ops)
    except (ImportError, OSError) as exc:  # missing file, undefined symbol, ABI mismatch
        _C = None
        _load_error = f"{type(exc).__name__}: {exc}"


def has_ops() -> bool:
    """True when the compiled kernels are loaded (torchvision's ``_has_ops`` idiom)."""
    return _C is not None


def has_cuda_ops() -> bool:
    return _C is not None and bool(_C.with_cuda)


def use_compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled op can serve these tensors; warns once when it cannot because it is missing."""
    global _warned
    if _C is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"fastadapt: compiled kernels unavailable ({_load_error}); using the pure-PyTorch fallback",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return bool(_C.with_cuda) or not any(t is not None and t.is_cuda for t in tensors)


def build_info() -> dict:
    """What was built and whether it loaded."""
    info = {
        "fastadapt_version": __version__,
        "torch_runtime": torch.__version__,
        "torch_built_against": getattr(_C, "torch_version", None),
        "cpu_kernels": _C is not None,
        "cuda_kernels": bool(_C is not None and _C.with_cuda),
        "cuda_archs": (getattr(_C, "cuda_archs", "") or None) if _C is not None else None,
        "extension_loaded": _C is not None,
        "load_error": _load_error,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # linear_relu's float32/float64 CPU GEMMs: the BLAS torch links, called directly, or at::mm
        "cpu_blas": bool(_C is not None and _C.cpu_blas()),
    }
    return info


def empty_cache() -> int:
    """Releases the idle CPU gradient buffers fastadapt keeps for reuse; returns the bytes freed.

    Large CPU loss gradients come from a small cache of huge-page-advised blocks (at most
    FASTADAPT_CPU_CACHE_MB, default 2048, of idle memory), so a training loop does not pay the
    page faults of a fresh allocation every step. Like torch.cuda.empty_cache, this only returns
    memory no tensor is using.
    """
    return int(_C.empty_cache()) if _C is not None else 0
