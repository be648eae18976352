"""Build of the compiled library ``intruder_ext._C``.

CPU kernels are always built. CUDA kernels are built when a CUDA toolkit (nvcc) is found and
torch is a CUDA build, whether or not a GPU is visible. ``INTRUDER_EXT_CUDA=1`` forces CUDA
(and fails clearly without a toolkit), ``INTRUDER_EXT_CUDA=0`` forces a CPU-only build.
Metadata, dependencies and the console script live in ``pyproject.toml``.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Ampere and Hopper, plus PTX so newer GPUs can JIT, when no arch list is given and no GPU is seen.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"intruder_ext setup: {msg}", file=sys.stderr)


def toolkit_root_from_nvcc(nvcc):
    """nvcc may be a wrapper script; ask nvcc itself where its toolkit is."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_root_from_nvcc(nvcc)
    return None


def want_cuda(torch_cuda_version, cuda_home):
    override = os.environ.get("INTRUDER_EXT_CUDA", "").strip().lower()
    if override in ("0", "false", "no", "off"):
        log("INTRUDER_EXT_CUDA=0: building CPU kernels only")
        return False
    forced = override in ("1", "true", "yes", "on")
    if override and not forced and override != "auto":
        raise SystemExit(f"intruder_ext setup: INTRUDER_EXT_CUDA must be 0, 1 or auto (got {override!r})")
    problems = []
    if torch_cuda_version is None:
        problems.append("the installed torch is a CPU-only build (torch.version.cuda is None)")
    if cuda_home is None:
        problems.append("no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset)")
    if problems:
        if forced:
            raise SystemExit("intruder_ext setup: INTRUDER_EXT_CUDA=1 but " + " and ".join(problems))
        log("building CPU kernels only: " + " and ".join(problems))
        return False
    return True


def nvidia_wheel_lib_dirs():
    """Library dirs of the nvidia-* wheels that a CUDA torch build depends on: installed beside
    torch, which need not be this interpreter's site-packages (a venv over the system's, --user)."""
    import torch

    dirs = []
    beside_torch = os.path.dirname(os.path.dirname(torch.__file__))
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], beside_torch}:
        dirs += glob.glob(os.path.join(root, "nvidia", "*", "lib"))
    return sorted(set(dirs))


def link_args_for(lib, lib_dirs):
    """-l flag for ``lib``: wheels ship only versioned ``libX.so.N`` files, so name one exactly."""
    for d in lib_dirs:
        if os.path.exists(os.path.join(d, f"lib{lib}.so")):
            return [f"-L{d}", f"-l{lib}"]
    for d in lib_dirs:
        versioned = sorted(glob.glob(os.path.join(d, f"lib{lib}.so.[0-9]*")), key=len)
        if versioned:
            return [f"-L{d}", f"-l:{os.path.basename(versioned[0])}"]
    raise SystemExit(f"intruder_ext setup: lib{lib}.so not found in any of {lib_dirs}")


def build_extension():
    # CUDA_HOME must be right before torch.utils.cpp_extension computes it at import time.
    cuda_home = find_cuda_home()
    if cuda_home and os.environ.get("INTRUDER_EXT_CUDA", "").strip() != "0":
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = want_cuda(torch.version.cuda, cuda_home)
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    extra_link = ["-fopenmp"]

    if not use_cuda:
        ext = CppExtension("intruder_ext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=extra_link, py_limited_api=True)
        return ext, BuildExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCH_LIST}")
    log(f"building CUDA kernels with the toolkit in {cuda_home} (torch CUDA {torch.version.cuda})")

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    lib_dirs = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")] + nvidia_wheel_lib_dirs()
    lib_dirs = [d for d in lib_dirs if os.path.isdir(d)]
    include_dirs = [os.path.join(os.path.dirname(d), "include") for d in lib_dirs]
    include_dirs = [d for d in include_dirs if os.path.isdir(d)]
    link = extra_link + link_args_for("cusolver", lib_dirs) + link_args_for("cublas", lib_dirs)
    # Installed next to site-packages/nvidia/*/lib (wheels) or built against a system toolkit.
    rpaths = ["$ORIGIN/../nvidia/cu13/lib", "$ORIGIN/../nvidia/cusolver/lib",
              "$ORIGIN/../nvidia/cublas/lib"] + lib_dirs
    link += [f"-Wl,-rpath,{p}" for p in rpaths]
    # torch's Linux wheels keep at::cuda::getCurrentCUDASolverDnHandle in libtorch_cuda_linalg.so,
    # which torch itself loads lazily: link it, and find it next to torch at run time.
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.exists(os.path.join(torch_lib, "libtorch_cuda_linalg.so")):
        link += [f"-L{torch_lib}", "-ltorch_cuda_linalg",
                 "-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"]
    ext = CUDAExtension(
        "intruder_ext._C", cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DINTRUDER_EXT_WITH_CUDA"],
                            # -lineinfo: compute-sanitizer reports name source lines.
                            "nvcc": ["-O3", "-std=c++20", "-DINTRUDER_EXT_WITH_CUDA", "-lineinfo"]},
        extra_link_args=link, py_limited_api=True)
    return ext, BuildExtension


os.chdir(HERE)
extension, build_ext = build_extension()
setup(ext_modules=[extension],
      cmdclass={"build_ext": build_ext.with_options(no_python_abi_suffix=True)},
      options={"bdist_wheel": {"py_limited_api": "cp39"}})
