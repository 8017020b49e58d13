"""Which instruction set torch's CPU kernels may use: under one cap, old and new CPUs run the same kernels.

On a CPU, torch picks its kernels by what the processor can do, in three libraries, each with its
own switch (all read once, when the library first runs, so they must be set before `import torch`):

- ATen, torch's own vectorised kernels (elementwise ops, reductions, BatchNorm, the optimiser):
  ATEN_CPU_CAPABILITY = default | avx2 | avx512.
- oneMKL, the BLAS behind nn.Linear: MKL_CBWR (Conditional Numerical Reproducibility) = AVX2 |
  AVX512 | COMPATIBLE ...
- oneDNN, behind nn.Conv2d: ONEDNN_MAX_CPU_ISA = AVX2 | AVX512_CORE ...

A wider instruction set sums in a different order, so the same seed trains slightly different
weights (same accuracy, different bytes) on a CPU with AVX-512 than on one with AVX2 only. A cap
makes machines that have at least that instruction set run the same code paths. What else must
match for the same bits (README, "Reproducible across machines"): the number of threads (the
convolutions' and, under the avx2 cap, the matrix products' sums are split by thread); the torch
wheel for a CNN (oneDNN's kernels change between versions); for MKL_CBWR=AVX2 an Intel CPU (on
others MKL ignores it: `compatible` covers those, at 2-4x the time). Measured: bench/isa.py.
ONNX Runtime has no such switch and needs none: model.onnx holds the trained weights only, and
export writes the same file under any cap; evaluate's probabilities may differ in the last bits.
"""

import os
import sys
from collections.abc import MutableMapping

CPU_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
# trainer.cpu_isa -> the variables that cap each library at that instruction set.
# `native`: every library picks the best this CPU has (fastest; the same bits only on CPUs of the same ISA).
CPU_ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    # Any x86-64 CPU with AVX2, Intel or AMD: AVX2 kernels in ATen and oneDNN, and MKL's portable
    # branch (its AVX2 branch is Intel's alone: elsewhere MKL ignores it and picks its own).
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512"},
    # Any x86-64 CPU, Intel or not: no vector kernels in ATen, SSE4.1 in oneDNN, MKL's portable branch.
    "compatible": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}


def cap_cpu_isa(isa: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the variables that cap the CPU kernels at `isa`, except those the user has set already;
    return the ones set.

    With no `environ`, this process's environment: call it before torch is imported (a stage:
    after reading params.yaml, before importing the library code), and the processes it starts
    (DDP's) inherit the cap. With `environ`, a mapping to start a process with.
    """
    if isa not in CPU_ISA_ENV:
        raise ValueError(f"cpu_isa={isa!r}: expected one of {', '.join(CPU_ISA_ENV)}")
    target = os.environ if environ is None else environ
    missing = {name: value for name, value in CPU_ISA_ENV[isa].items() if name not in target}
    if environ is None and missing and "torch" in sys.modules:
        # MKL and oneDNN may have read their variables already: the cap would hold in part, silently.
        raise RuntimeError(f"cap_cpu_isa({isa!r}) after `import torch`: call it before importing torch")
    target.update(missing)
    return missing
