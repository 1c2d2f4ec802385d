"""Build fastadapt._C: C++ kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Switches (environment):
  FASTADAPT_BUILD_EXT=0   build no compiled code (the package runs on its pure-PyTorch fallback)
  FASTADAPT_CUDA=0/1      force the CUDA kernels off / on (default: on when torch.version.cuda and nvcc exist)
  TORCH_CUDA_ARCH_LIST    honoured; defaults to "8.0;9.0+PTX" when unset and no GPU is visible
  MAX_JOBS                honoured by torch's ninja build

torch must be installed first and the build run with `pip install --no-build-isolation`: the extension
links against the very torch it is compiled with, so pyproject.toml does not list torch as a build
requirement (an isolated build would fetch another one). The torch a build used is recorded in
fastadapt/_build_info.py, next to _C, for fastadapt.ops._extension to compare with the running torch.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# setup.py commands that compile; the others (sdist, egg_info, dist_info) need no torch
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "install", "develop", "editable_wheel"}
NO_TORCH = """setup.py: torch is not importable here, and fastadapt's extension must be compiled against the torch
it will run with. Install torch first, then build without pip's isolated environment:
    pip install torch                                               # CUDA build (Linux default)
    pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU-only machines
    pip install --no-build-isolation fastadapt                      # or: pip install --no-build-isolation -e .
(FASTADAPT_BUILD_EXT=0 installs the pure-PyTorch fallback without compiling anything.)"""


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _nvidia_include_dirs():
    # ATen's CUDA headers include cusparse.h and cublas_v2.h; with a pip-installed CUDA torch these
    # live in site-packages/nvidia/<pkg>/include, not in the toolkit's include directory.
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extensions():
    if _flag("FASTADAPT_BUILD_EXT") is False:
        print("fastadapt: FASTADAPT_BUILD_EXT=0, building no compiled code")
        return [], {}
    if not os.environ.get("CUDA_HOME"):
        # torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc wrapper script would make
        # that /usr/local, whose include/ and lib64/ hold no toolkit. Prefer the conventional location.
        for home in ("/usr/local/cuda", os.path.dirname(os.path.dirname(shutil.which("nvcc") or "/none/bin/nvcc"))):
            if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(os.path.join(home, "include")):
                os.environ["CUDA_HOME"] = home
                break
    try:
        import torch
    except ImportError:
        if BUILD_COMMANDS.intersection(sys.argv[1:]):
            sys.exit(NO_TORCH)
        return [], {}  # metadata or an sdist: nothing is compiled
    from torch.utils import cpp_extension

    want_cuda = _flag("FASTADAPT_CUDA")
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    use_cuda = have_cuda if want_cuda is None else want_cuda
    if use_cuda and not have_cuda:
        sys.exit("setup.py: FASTADAPT_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's own arch detection queries a GPU and fails without one
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

    # The per-capability vector kernels go last: the linker keeps the first copy of an inline function
    # it meets, which must be the portable one (ATen's CPU_CAPABILITY scheme relies on the same rule).
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    sources += sorted(glob.glob("csrc/cpu/vec/*.cpp"))
    # torch's cpp_extension adds the C++ standard its headers need. -fopenmp is not optional: with
    # ATen's OpenMP backend, at::parallel_for is a header template around `#pragma omp parallel`, and
    # without the flag every kernel here silently runs on one thread. The libgomp.so.1 it links is the
    # one torch already loaded (torch/lib/libgomp.so.1, same soname), so there is one thread pool.
    cxx = ["-O3", "-fopenmp"]
    # torch's headers (and the pip CUDA libraries' ones) as system headers: GCC then stops reporting
    # their own code under our -Wall (ATen's `#pragma unroll` and `#pragma clang diagnostic`, its
    # -Wpsabi notes), while every warning about csrc/ stays on. GCC takes a directory given both with -I
    # (torch adds those) and -isystem as a system one.
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    system_dirs = [torch_include, os.path.join(torch_include, "torch", "csrc", "api", "include")]
    if use_cuda:
        system_dirs += _nvidia_include_dirs()
    isystem = [flag for d in system_dirs for flag in ("-isystem", d)]
    cxx += isystem
    define_macros = []
    if os.environ.get("FASTADAPT_SANITIZE"):
        # vptr checks need RTTI of torch's (uninstrumented) classes and give false reports; every UBSan
        # report aborts (no recovery), so a report cannot scroll past unnoticed; -fno-wrapv undoes
        # Python's -fwrapv so that a signed overflow (an int32 offset, say) is reported, not wrapped.
        cxx += ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all", "-fno-wrapv",
                "-fno-omit-frame-pointer", "-O1", "-g"]
    cuda_archs = ""
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"] if os.environ.get("TORCH_CUDA_ARCH_LIST") else "auto"
        define_macros.append(("FASTADAPT_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + isystem}
        include_dirs = [os.path.join(ROOT, "csrc")] + _nvidia_include_dirs()
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
        include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros += [
        ("FASTADAPT_TORCH_VERSION", f'"{torch.__version__}"'),
        ("FASTADAPT_CUDA_ARCHS", f'"{cuda_archs}"'),
    ]
    link_args = ["-fopenmp"]
    if os.environ.get("FASTADAPT_SANITIZE"):
        link_args += ["-fsanitize=address,undefined", "-fno-sanitize=vptr"]
    ext = ext_cls(
        "fastadapt._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
        py_limited_api=False,
    )
    build_info = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda, "with_cuda": use_cuda}

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # Beside _C (the package in build_lib, or the source tree for --inplace and editable
            # installs), so that fastadapt can name the torch _C needs without loading it.
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("fastadapt._C")), "_build_info.py")
            with open(path, "w") as f:
                f.write('"""Written by setup.py when fastadapt._C was built: the torch it was compiled against."""\n')
                for key, value in build_info.items():
                    f.write(f"{key} = {value!r}\n")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fastadapt", "fastadapt.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
