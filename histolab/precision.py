"""Which floating-point type the networks run in, and why.

``--dtype auto`` (and HISTOLAB_DTYPE=auto in the app) picks, per device:

* CUDA: bfloat16 where the GPU supports it (as fast as float16 on tensor cores,
  and its range cannot overflow with strong adapters), else float16;
* CPU with native bfloat16 arithmetic (x86 ``avx512_bf16`` or AMX ``amx_bf16``
  in /proc/cpuinfo): bfloat16. Measured on the embedded model on a 2-core AMD
  EPYC with avx512_bf16 (no AMX): one U-Net pass at batch 8 took 97.7 ms in
  float32 and 63.1 ms with bfloat16 weights, a VAE decode 18.1 vs 12.4 ms
  (bench/generation.py prints the whole-generation ratio);
* any other CPU: float32 (without those instructions PyTorch emulates bfloat16
  matmuls, which is slower than float32).

Whatever the dtype, the sampler's arithmetic (latents, guidance, scheduler
steps) stays in float32 (histolab.generation): only the networks round to
bfloat16, so its images differ from float32's by rounding alone
(bench/precision_fid.py measures the FID of both). The dtype a model ran in is
recorded in each image's recipe, so a re-run picks the same one.

``torch.compile`` is not part of ``auto``: its first call took 98.9 s on that
CPU, longer than a Space visitor waits; ``--compile`` offers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histolab.errors import InvalidRequest

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
# CPU flags meaning "bfloat16 dot products in hardware", most capable first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuBf16:
    """What the CPU offers for bfloat16: the flag found ('' if none) and where it was looked for."""

    flag: str
    source: str

    @property
    def supported(self) -> bool:
        return bool(self.flag)

    def describe(self) -> str:
        if self.flag:
            return f"CPU has {self.flag} ({self.source}): bfloat16 networks"
        return f"CPU has neither {' nor '.join(BF16_FLAGS)} ({self.source}): float32"


def detect_cpu_bf16(cpuinfo: Path = CPUINFO) -> CpuBf16:
    """Read the CPU flags (Linux). Elsewhere nothing is found, and auto stays float32."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return CpuBf16("", f"{cpuinfo} unreadable")
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break  # every core lists the same flags
    found = next((f for f in BF16_FLAGS if f in flags), "")
    return CpuBf16(found, str(cpuinfo))


def check_dtype_name(name: str) -> str:
    if name not in DTYPE_NAMES:
        raise InvalidRequest(f"dtype must be one of {', '.join(DTYPE_NAMES)} but is {name!r}")
    return name


def auto_dtype_name(device: str, cpu: CpuBf16 | None = None) -> str:
    """The dtype ``auto`` stands for on ``device`` (see the module docstring)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu":
        return "bfloat16" if (cpu or detect_cpu_bf16()).supported else "float32"
    return "float32"


def resolve_dtype(name: str, device: str, cpu: CpuBf16 | None = None):
    """The torch dtype for a name of DTYPE_NAMES on ``device``."""
    import torch

    check_dtype_name(name)
    return getattr(torch, auto_dtype_name(device, cpu) if name == "auto" else name)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what recipes and run manifests record)."""
    return str(dtype).removeprefix("torch.")
