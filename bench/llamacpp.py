"""Whether this machine's llama-cpp-python can stand in for llama.cpp in the benchmarks, and if not, why.

llama.cpp is the baseline the export and runtime targets are stated against (bench/export.py, bench/runtime.py).
The wheel compiles for the CPU it is installed on, and on a CPU with AMX (Intel Sapphire Rapids and later) ggml
then routes the GGUF's Q4_1 weights through its AMX kernels: with llama-cpp-python 0.3.36 the first decode of the
default model segfaults in `ggml_backend_amx_mul_mat` (session 26; ggml-org/llama.cpp#20824, open), and those
kernels mis-compute Q4_0/Q4_1 (ggml-org/llama.cpp#16315). A crash would take the whole benchmark down with it, so
such a build is refused with the command that builds one without AMX (AVX-512 and VNNI kept), as the README says.
"""
from __future__ import annotations

NO_AMX_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                '-DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON '
                '-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
                '.venv/bin/pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36')


def unusable() -> str | None:
    """None when llama.cpp can be measured here, else the reason to print in its table rows."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        return f"built with ggml's AMX kernels, which crash on this model; rebuild without them: {NO_AMX_BUILD}"
    return None
