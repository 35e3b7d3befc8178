"""The machine a benchmark ran on, as BENCHMARKS.md names it: the CPU model and the instruction
sets that decide CLIP's speed (AVX2, AVX-512, bf16 and fp16 instructions, AMX)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISA = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"]


def cpu_description() -> str:
    """E.g. `Intel(R) Xeon(R) Platinum 8488C, 2 cores (avx2 avx512f avx512_bf16 amx_bf16)`."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    isa = " ".join(f for f in ISA if f in flags) or "no AVX2"
    return f"{model}, {os.cpu_count()} cores ({isa})"
