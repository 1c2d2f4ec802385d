"""Loading of the compiled extension, with a pure-PyTorch fallback when it is missing.

Importing fastadapt does not fail by default: if ``fastadapt._C`` is absent, was built against another
torch than the one running, fails to load, or is disabled with ``FASTADAPT_DISABLE_EXTENSION=1``, every
op runs its pure-PyTorch reference and one warning names the reason (at import for a failure, at the
first op for ``FASTADAPT_DISABLE_EXTENSION=1``, which the user asked for). With
``FASTADAPT_REQUIRE_EXTENSION=1`` a failure is an ImportError instead (an explicit
``FASTADAPT_DISABLE_EXTENSION=1`` still wins: it asks for the fallback in so many words).
"""
from __future__ import annotations

import os
import warnings

import torch

from fastadapt._version import __version__

_C = None
_load_error: str | None = None
_warned = False

# Reinstalling from a wheel cached for the old torch would bring the same mismatch back, hence --no-cache-dir.
REINSTALL = ("pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps fastadapt "
             "(in a source checkout: pip install --no-build-isolation -e .)")


def _torch_desc(version: str, cuda: str | None) -> str:
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU-only'})"


def _read_build_info():
    """What setup.py recorded about the build of _C (fastadapt/_build_info.py), read without loading _C;
    None for an extension built before the record existed, or no build at all."""
    try:
        from fastadapt import _build_info
    except ImportError:
        return None
    return _build_info


_built = _read_build_info()
_disabled = os.environ.get("FASTADAPT_DISABLE_EXTENSION", "0") not in ("", "0")
if _disabled:
    _load_error = "disabled by FASTADAPT_DISABLE_EXTENSION=1"
elif _built is not None and _built.torch_version != torch.__version__:
    # Not even tried: an extension built against another torch either fails to load (a CUDA build under a
    # CPU torch misses libc10_cuda.so) or loads with a mismatched C++ ABI.
    _load_error = (f"fastadapt's extension was built against {_torch_desc(_built.torch_version, _built.cuda_version)}, "
                   f"running {_torch_desc(torch.__version__, torch.version.cuda)}: reinstall with `{REINSTALL}`")
else:
    try:
        from fastadapt import _C  # noqa: F811  (loading it registers the fastadapt:: ops)
    except (ImportError, OSError) as exc:  # no build, undefined symbol, missing shared library
        _C = None
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fastadapt._C":
            _load_error = ("fastadapt was installed without its compiled extension (FASTADAPT_BUILD_EXT=0, or a "
                           f"source tree never built): to build it, `{REINSTALL}`")
        else:
            _load_error = f"{type(exc).__name__}: {exc}"

if _C is None and not _disabled:
    if os.environ.get("FASTADAPT_REQUIRE_EXTENSION", "0") not in ("", "0"):
        raise ImportError(f"FASTADAPT_REQUIRE_EXTENSION=1 but fastadapt's compiled extension is unavailable: {_load_error}")
    _warned = True  # said here, at import, where the cause is; not again at the first op
    warnings.warn(f"fastadapt: compiled kernels unavailable ({_load_error}); using the pure-PyTorch fallback",
                  RuntimeWarning, stacklevel=2)


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
        "torch_built_against": getattr(_C, "torch_version", None) or getattr(_built, "torch_version", None),
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

    Only with FASTADAPT_CPU_CACHE_MB=N set (N > 0; the default is 0, no cache) do large CPU loss
    gradients come from a cache of huge-page-advised blocks, at most N MB of them idle, so that a
    training loop does not pay the page faults of a fresh allocation every step. Those idle blocks stay
    resident between steps and raise a step's peak memory above eager's (csrc/cpu/grad_buffer.h says
    why it is off by default). Like torch.cuda.empty_cache, this only returns memory no tensor is using.
    """
    return int(_C.empty_cache()) if _C is not None else 0
