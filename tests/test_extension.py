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


def run_snippet(env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_info_keys_and_types():
    info = fastadapt.build_info()
    for key in ("torch_built_against", "cpu_kernels", "cuda_kernels", "cuda_archs", "extension_loaded", "load_error"):
        assert key in info
    assert info["extension_loaded"] == fastadapt.has_ops()
    if info["extension_loaded"]:
        assert info["cpu_kernels"] is True and info["load_error"] is None
        assert info["torch_built_against"] == torch.__version__
    else:
        assert info["load_error"]


def test_disabled_extension_falls_back_and_warns_once():
    res = run_snippet({"FASTADAPT_DISABLE_EXTENSION": "1"})
    assert res["info"]["extension_loaded"] is False
    assert "FASTADAPT_DISABLE_EXTENSION" in res["info"]["load_error"]
    assert len(res["warnings"]) == 1 and "pure-PyTorch fallback" in res["warnings"][0]
    assert abs(res["value"] - res["expected"]) < 1e-5


def test_cli_info_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["extension_loaded"] == fastadapt.has_ops()
