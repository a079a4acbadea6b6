"""Build script.

The pure-Python packages are declared here because `kernels/` and `export/`
live at the top of the repository but install as `cambrian.kernels` and
`cambrian.export` (one import namespace).  Native extensions from `csrc/`
(C++ CPU kernels, and CUDA kernels when torch has CUDA) are added to
`ext_modules` when their sources exist.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

from setuptools import setup

PACKAGE_DIR = {"cambrian": "cambrian", "cambrian.kernels": "kernels", "cambrian.export": "export"}


def find_packages_mapped() -> list[str]:
    packages = []
    for pkg, root in PACKAGE_DIR.items():
        for dirpath, _dirnames, filenames in os.walk(root):
            if "__init__.py" not in filenames or "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, root)
            name = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            if name.startswith("cambrian.kernels") and pkg == "cambrian":
                continue
            packages.append(name)
    return sorted(set(packages))


def native_extensions():
    """C++/CUDA extensions from csrc/, built only when sources are present."""
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources or os.environ.get("CAMBRIAN_SKIP_NATIVE") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    import torch

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    common = dict(
        include_dirs=[os.path.abspath("csrc")],
        # the kernels live in headers (kernels_impl.h, included once per ISA): without them here an in-place
        # rebuild after editing only a header would keep the old objects
        depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)),
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )
    if cuda_sources and torch.version.cuda is not None and os.environ.get("CAMBRIAN_SKIP_CUDA") != "1":
        ext = CUDAExtension("cambrian.kernels._C", cpu_sources + cuda_sources, **common,
                            define_macros=[("CAMBRIAN_WITH_CUDA", "1")])
    else:
        common["extra_compile_args"] = common["extra_compile_args"]["cxx"]
        ext = CppExtension("cambrian.kernels._C", cpu_sources, **common)
    return [ext], {"build_ext": atomic_copy_build_ext(BuildExtension.with_options(use_ninja=False))}


def atomic_copy_build_ext(base: type) -> type:
    """`base` (a build_ext) whose file copies replace the destination atomically.

    An editable / in-place build copies the freshly linked `_C*.so` over `kernels/_C*.so`.  distutils'
    copy_file truncates and rewrites the existing file, i.e. the same inode that every running process
    with the extension loaded has mmapped -- they crash (SIGBUS / garbage code) on their next call into it.
    Writing a temporary file in the destination directory and renaming it over the old name gives the
    path a new inode instead; running processes keep the old one mapped until they exit.
    """

    class AtomicCopyBuildExt(base):
        def copy_file(self, infile, outfile, preserve_mode=True, preserve_times=True, link=None, level=1):
            if link is not None or getattr(self, "dry_run", False):
                return super().copy_file(infile, outfile, preserve_mode, preserve_times, link, level)
            dest = os.path.join(outfile, os.path.basename(infile)) if os.path.isdir(outfile) else outfile
            directory = os.path.dirname(os.path.abspath(dest))
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as out, open(infile, "rb") as src:
                    shutil.copyfileobj(src, out)
                if preserve_mode:
                    shutil.copymode(infile, tmp)
                else:  # mkstemp made it 0600
                    os.chmod(tmp, 0o644)
                if preserve_times:
                    st = os.stat(infile)
                    os.utime(tmp, (st.st_atime, st.st_mtime))
                os.replace(tmp, dest)  # atomic on POSIX: the old inode lives on for whoever has it open
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            print(f"copying {infile} -> {dest} (atomic replace)")
            return dest, 1

    return AtomicCopyBuildExt


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages_mapped(),
    package_dir=PACKAGE_DIR,
    package_data={"cambrian": ["py.typed", "assets/tiny-cambrian-shapes/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
