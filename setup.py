"""Builds the CPU kernels (kernels/nf4_cpu.c, kernels/ggml_cpu.c with kernels/decode_cpu.c,
memory_bank/search_cpu.c) as
`longside.kernels._nf4_cpu`, `longside.kernels._ggml_cpu` and `longside.memory_bank._search_cpu`.

Package metadata lives in pyproject.toml; this file only adds the C extensions. Each is a
plain shared library (no Python or torch headers) loaded with ctypes by kernels/cpu.py.
The AVX2 code is compiled per function (`target("avx2,fma")`) and chosen at run time, so
the library also runs on CPUs without AVX2.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class _PlainLibrary(build_ext):
    """Build the ctypes library without the `PyInit_` export check of a Python module."""

    def get_export_symbols(self, ext):
        return []


_openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
setup(
    ext_modules=[
        Extension(
            "longside.kernels._nf4_cpu",
            sources=["kernels/nf4_cpu.c"],
            extra_compile_args=["-O3", "-std=c11", *_openmp],
            extra_link_args=_openmp,
        ),
        # -ffp-contract=off: dequantization must round like the gguf package (no fused multiply-add)
        Extension(
            "longside.kernels._ggml_cpu",
            sources=["kernels/ggml_cpu.c", "kernels/decode_cpu.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", *_openmp],
            extra_link_args=[*_openmp, "-lm"],
        ),
        Extension(
            "longside.memory_bank._search_cpu",
            sources=["memory_bank/search_cpu.c"],
            extra_compile_args=["-O3", "-std=c11", *_openmp],
            extra_link_args=[*_openmp, "-lm"],
        ),
    ],
    cmdclass={"build_ext": _PlainLibrary},
)
