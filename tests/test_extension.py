"""Build info, extension loading and the warn-once fallback."""
import json
import os
import subprocess
import sys

import torch

import fastadapt

SNIPPET = """
import warnings, json, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import fastadapt
    x = torch.randn(6, 4, requires_grad=True); y = torch.randint(0, 4, (6,))
    a = fastadapt.alpha_weighted_cross_entropy(x, y, x, y, 0.3)
    b = fastadapt.alpha_weighted_cross_entropy(x, y, x, y, 0.3)
    a.backward()
msgs = [str(m.message) for m in w if "fastadapt" in str(m.message)]
print(json.dumps({"info": fastadapt.build_info(), "warnings": msgs,
                  "value": float(a), "expected": float(torch.nn.functional.cross_entropy(x, y))}))
"""


# Stands in for the fastadapt/_build_info.py of an extension built against another torch.
OTHER_BUILD = """
import sys, types
sys.modules["fastadapt._build_info"] = types.SimpleNamespace(torch_version="2.3.0+cu121", cuda_version="12.1",
                                                             with_cuda=True)
"""


def run_snippet(env_extra, prefix="", check=True):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", prefix + SNIPPET], env=env, capture_output=True, text=True,
                         timeout=120)
    if not check:
        return out
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_info_keys_and_types():
    info = fastadapt.build_info()
    for key in ("torch_built_against", "cpu_kernels", "cuda_kernels", "cuda_archs", "extension_loaded", "load_error",
                "cpu_blas"):
        assert key in info
    assert info["extension_loaded"] == fastadapt.has_ops()
    if info["extension_loaded"]:
        assert info["cpu_kernels"] is True and info["load_error"] is None
        assert info["torch_built_against"] == torch.__version__
        from fastadapt import _build_info  # written beside _C by every build since it exists

        assert _build_info.torch_version == torch.__version__
        assert _build_info.with_cuda == info["cuda_kernels"]
    else:
        assert info["load_error"]


def test_disabled_extension_falls_back_and_warns_once():
    res = run_snippet({"FASTADAPT_DISABLE_EXTENSION": "1"})
    assert res["info"]["extension_loaded"] is False
    assert "FASTADAPT_DISABLE_EXTENSION" in res["info"]["load_error"]
    assert len(res["warnings"]) == 1 and "pure-PyTorch fallback" in res["warnings"][0]
    assert abs(res["value"] - res["expected"]) < 1e-5


def _runtime_desc():
    return f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'})"


def test_other_torch_build_is_named_at_import_once():
    """An extension built against another torch is not loaded: one warning at import names both torches and
    the reinstall command; the ops run on the fallback without a second warning."""
    env = {"FASTADAPT_REQUIRE_EXTENSION": "0", "FASTADAPT_DISABLE_EXTENSION": "0"}
    res = run_snippet(env, prefix=OTHER_BUILD)
    assert res["warnings"] == [
        "fastadapt: compiled kernels unavailable (fastadapt's extension was built against torch 2.3.0+cu121 "
        f"(CUDA 12.1), running {_runtime_desc()}: reinstall with `pip install --no-build-isolation --no-cache-dir "
        "--force-reinstall --no-deps fastadapt (in a source checkout: pip install --no-build-isolation -e .)`); "
        "using the pure-PyTorch fallback"]
    assert res["info"]["extension_loaded"] is False and res["info"]["torch_built_against"] == "2.3.0+cu121"
    assert abs(res["value"] - res["expected"]) < 1e-5


def test_require_extension_turns_the_fallback_into_an_import_error():
    out = run_snippet({"FASTADAPT_REQUIRE_EXTENSION": "1", "FASTADAPT_DISABLE_EXTENSION": "0"}, prefix=OTHER_BUILD,
                      check=False)
    assert out.returncode == 1
    assert ("ImportError: FASTADAPT_REQUIRE_EXTENSION=1 but fastadapt's compiled extension is unavailable: "
            "fastadapt's extension was built against torch 2.3.0+cu121 (CUDA 12.1), running "
            f"{_runtime_desc()}") in out.stderr


def test_missing_extension_is_named_at_import():
    # as after FASTADAPT_BUILD_EXT=0: no fastadapt._C to import
    res = run_snippet({"FASTADAPT_REQUIRE_EXTENSION": "0", "FASTADAPT_DISABLE_EXTENSION": "0"},
                      prefix="import sys\nsys.modules['fastadapt._C'] = None\n")
    assert res["warnings"] == [
        "fastadapt: compiled kernels unavailable (fastadapt was installed without its compiled extension "
        "(FASTADAPT_BUILD_EXT=0, or a source tree never built): to build it, `pip install --no-build-isolation "
        "--no-cache-dir --force-reinstall --no-deps fastadapt (in a source checkout: pip install "
        "--no-build-isolation -e .)`); using the pure-PyTorch fallback"]
    assert res["info"]["extension_loaded"] is False
    assert abs(res["value"] - res["expected"]) < 1e-5


def test_disable_extension_wins_over_require():
    res = run_snippet({"FASTADAPT_REQUIRE_EXTENSION": "1", "FASTADAPT_DISABLE_EXTENSION": "1"}, prefix=OTHER_BUILD)
    assert res["info"]["extension_loaded"] is False
    assert res["info"]["load_error"] == "disabled by FASTADAPT_DISABLE_EXTENSION=1"
    assert len(res["warnings"]) == 1 and "pure-PyTorch fallback" in res["warnings"][0]


def test_version_is_the_package_metadata_version():
    from importlib.metadata import PackageNotFoundError, version

    assert fastadapt.__version__ == fastadapt.build_info()["fastadapt_version"]
    assert fastadapt.__version__.count(".") >= 2 and fastadapt.__version__.split(".")[0].isdigit()
    try:
        installed = version("fastadapt")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return
    assert installed == fastadapt.__version__


def test_cli_info_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["extension_loaded"] == fastadapt.has_ops()


CACHE_SNIPPET = """
import json, torch, fastadapt
from fastadapt.ops import _extension
xs = torch.randn(512, 16384, requires_grad=True)  # 32 MB gradients: large enough for the cache
xt = torch.randn(512, 16384, requires_grad=True)
y = torch.randint(0, 16384, (512,))
fastadapt.alpha_weighted_cross_entropy(xs, y, xt, y, 0.5).backward()
ptrs = {xs.grad.data_ptr(), xt.grad.data_ptr()}
xs.grad = xt.grad = None  # with the cache on, both blocks go back to it ...
idle = _extension._C.cache_stats()
fastadapt.alpha_weighted_cross_entropy(xs, y, xt, y, 0.5).backward()
reused = {xs.grad.data_ptr(), xt.grad.data_ptr()} == ptrs  # ... and are reused, not re-faulted
in_use = _extension._C.cache_stats()
xs.grad = xt.grad = None
freed = fastadapt.empty_cache()
print(json.dumps(dict(idle=idle, reused=reused, in_use=in_use, freed=freed, after=_extension._C.cache_stats())))
"""


def _cache_run(cache_mb):
    """CACHE_SNIPPET in a fresh process (the cache's size is read once per process); None: the default."""
    env = {k: v for k, v in os.environ.items() if k != "FASTADAPT_CPU_CACHE_MB"}
    if cache_mb is not None:
        env["FASTADAPT_CPU_CACHE_MB"] = str(cache_mb)
    out = subprocess.run([sys.executable, "-c", CACHE_SNIPPET], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_gradient_cache_reuses_and_releases():
    if not fastadapt.has_ops():
        return
    block = 512 * 16384 * 4
    res = _cache_run(64)
    assert res["idle"] == [2 * block, 2] and res["reused"] and res["in_use"] == [0, 0], res
    assert res["freed"] == 2 * block and res["after"] == [0, 0], res
    res = _cache_run(32)  # room for one idle block: the second is freed
    assert res["idle"] == [block, 1] and res["freed"] == block, res


def test_cpu_gradient_cache_is_off_by_default():
    # it keeps one step's gradients resident and raises the step's peak (csrc/cpu/grad_buffer.h)
    if not fastadapt.has_ops():
        return
    res = _cache_run(None)
    assert res["idle"] == [0, 0] and res["freed"] == 0 and res["after"] == [0, 0], res


def test_a_built_extension_loads():
    """`make test` builds the extension and sets FASTADAPT_REQUIRE_EXTENSION=1: a kernel that fails to load
    (an undefined symbol, say) must fail the run, not pass it quietly on the pure-PyTorch fallback."""
    if os.environ.get("FASTADAPT_REQUIRE_EXTENSION", "0") in ("", "0"):
        import pytest

        pytest.skip("FASTADAPT_REQUIRE_EXTENSION is not set")
    info = fastadapt.build_info()
    assert info["extension_loaded"], info["load_error"]
    assert info["load_error"] is None


def test_linear_relu_finds_the_blas_torch_links():
    """With MKL (the x86 wheels) linear_relu's CPU GEMMs must take the direct BLAS path, not at::mm."""
    import pytest

    if not fastadapt.has_ops() or not torch.backends.mkl.is_available():
        pytest.skip("needs the compiled extension and an MKL build of torch")
    assert fastadapt.build_info()["cpu_blas"] is True
