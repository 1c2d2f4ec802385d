"""The sdist carries everything the build and the tests need: it is built from a copy of the checkout's
files (no compile: FASTADAPT_BUILD_EXT=0, so nothing but MANIFEST.in brings the C++/CUDA sources and
headers in) and its file list is compared with `git ls-files`."""
import email
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

import fastadapt

ROOT = pathlib.Path(__file__).resolve().parent.parent
# what a build from the sdist and `make test` in its unpacked tree read
NEEDED_DIRS = ("csrc/", "fastadapt/", "tests/", "docs/", "benchmarks/")
NEEDED_FILES = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "Makefile"}


def _git_files():
    """Tracked and untracked-but-not-ignored files of the checkout (a new file counts before its commit);
    skips outside a git checkout (an unpacked sdist, say)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the sdist's file list is checked against `git ls-files`")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: the sdist's file list is checked against `git ls-files`")
    return {f for f in out.stdout.splitlines() if (ROOT / f).is_file()}


def _needed(path):
    if path.startswith("benchmarks/"):
        return path.endswith(".py")  # the smoke runs of `make test`; not the plots and result JSON
    return path in NEEDED_FILES or path.startswith(NEEDED_DIRS)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    files = _git_files()
    src = tmp_path_factory.mktemp("src")
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src,
                         env={**os.environ, "FASTADAPT_BUILD_EXT": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (archive,) = dist.glob("fastadapt-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top = f"fastadapt-{fastadapt.__version__}/"
        members = {n[len(top):] for n in names if n.startswith(top) and tar.getmember(n).isfile()}
        pkg_info = email.message_from_bytes(tar.extractfile(top + "PKG-INFO").read())
    return files, names, members, pkg_info, out.stdout + out.stderr


def test_sdist_holds_every_file_the_build_and_tests_need(sdist):
    files, names, members, _, _ = sdist
    top = f"fastadapt-{fastadapt.__version__}/"
    assert all(n.startswith(top) or n == top.rstrip("/") for n in names), names[:5]
    needed = {f for f in files if _needed(f)}
    assert {"csrc/autograd/util.h", "csrc/cuda/common.cuh", "LICENSE", "MANIFEST.in"} <= needed
    assert sorted(needed - members) == []


def test_sdist_holds_no_build_outputs(sdist):
    _, _, members, _, _ = sdist
    assert [m for m in members if m.endswith((".so", ".o", ".pyc")) or m == "fastadapt/_build_info.py"] == []


def test_sdist_metadata(sdist):
    _, _, members, pkg_info, log = sdist
    assert pkg_info["Version"] == fastadapt.__version__
    assert pkg_info["License-Expression"] == "BSD-3-Clause"
    assert pkg_info.get_all("License-File") == ["LICENSE"]
    # (MANIFEST.in's excludes of build outputs warn when a clean tree has none: not a deprecation)
    assert "Deprecat" not in log, log


@pytest.fixture
def no_torch_env(tmp_path):
    """An environment whose `import torch` fails, as in pip's isolated build environment (torch is not a
    build requirement): a package named torch that raises first on the path."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path), "FASTADAPT_BUILD_EXT": ""}


def test_build_without_torch_stops_with_the_instructions(no_torch_env, tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=ROOT, env=no_torch_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1
    assert "setup.py: torch is not importable here" in out.stderr
    assert "pip install --no-build-isolation fastadapt" in out.stderr
    assert "https://download.pytorch.org/whl/cpu" in out.stderr
    assert not (tmp_path / "l").exists()


def test_metadata_without_torch_needs_none(no_torch_env, tmp_path):
    # what pip asks of an sdist before it builds: the metadata (the version comes from _version.py, read
    # without importing the package, whose __init__ imports torch)
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                         env=no_torch_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pkg_info = email.message_from_string((tmp_path / "fastadapt.egg-info" / "PKG-INFO").read_text())
    assert pkg_info["Version"] == fastadapt.__version__
