"""Builds kt_cpu_amx._kernels. Each ISA's kernels are a separate translation unit compiled with its own -m
flags, so the extension loads on any x86-64 CPU and picks the kernels at run time. libnuma is used when its
header and library are found (KT_CPU_NUMA=0 turns it off)."""

import ctypes.util
import os
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

BASE = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno"]
ISA_FLAGS = {
    "kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "kernels_amx.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                        "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
SOURCES = ["pack.cpp", "iq.cpp", "pool.cpp", "cpu_features.cpp", "engine.cpp", "decoder.cpp", "bindings.cpp", "host_launch.cpp", *ISA_FLAGS]


def have_numa() -> bool:
    if os.environ.get("KT_CPU_NUMA", "1") == "0":
        return False
    inc = sysconfig.get_config_var("INCLUDEDIR") or "/usr/include"
    header = any(os.path.exists(os.path.join(d, "numa.h")) for d in (inc, "/usr/include", "/usr/local/include"))
    return header and ctypes.util.find_library("numa") is not None


class PerFileFlagsBuildExt(build_ext):
    """Compiles each source with its ISA flags, two at a time, then links once."""

    def build_extension(self, ext):
        cc = self.compiler
        macros = list(ext.define_macros)
        objects_dir = self.build_temp

        def compile_one(src):
            extra = ext.extra_compile_args + ISA_FLAGS.get(os.path.basename(src), [])
            return cc.compile([src], output_dir=objects_dir, macros=macros, include_dirs=ext.include_dirs,
                              extra_postargs=extra, depends=ext.depends)

        with ThreadPoolExecutor(max_workers=int(os.environ.get("KT_CPU_BUILD_JOBS", "2"))) as pool:
            objects = [o for objs in pool.map(compile_one, ext.sources) for o in objs]
        cc.link_shared_object(objects, self.get_ext_fullpath(ext.name), libraries=ext.libraries,
                              library_dirs=ext.library_dirs, extra_postargs=ext.extra_link_args,
                              target_lang="c++")


numa = have_numa()
ext = Pybind11Extension(
    "kt_cpu_amx._kernels",
    [os.path.join("csrc", s) for s in SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=BASE,
    define_macros=[("KT_HAVE_NUMA", "1")] if numa else [],
    libraries=["numa"] if numa else [],
    extra_link_args=["-pthread"],
    depends=[os.path.join("csrc", h) for h in ("common.h", "kernels.h", "kernels_impl.h", "kernels_i8.h", "engine.h", "pool.h",
                                                "pack.h", "cpu_features.h", "decoder.h", "iq.h",
                                                "iq_decode.h", "kernels_iq.h")],
    cxx_std=17,
)
setup(ext_modules=[ext], cmdclass={"build_ext": PerFileFlagsBuildExt})
