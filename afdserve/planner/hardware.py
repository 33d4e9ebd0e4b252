"""GPU catalog: memory, bandwidth, bf16 compute, relative price and power per GPU type.

Units: GB and GB/s are decimal (1e9 bytes); TFLOP/s are dense bf16 tensor-core peaks;
price is relative, with the L20 = 1.00 as in the paper's Table 3.

Sources:
- L20, H800, A800, H20, L40S: price, memory, bandwidth and TFLOP/s from MegaScale-Infer
  (arXiv 2504.02263) Table 3. Power: NVIDIA product pages (L20 275 W, H800 SXM 700 W,
  A800 SXM 400 W, H20 400 W, L40S 350 W).
- A100-80GB SXM: NVIDIA A100 datasheet (80 GB HBM2e, 2039 GB/s, 312 TFLOP/s bf16, 400 W).
- H100 SXM: NVIDIA H100 datasheet (80 GB HBM3, 3.35 TB/s, 1979 TFLOP/s bf16 *with sparsity*
  = 989 dense, 700 W).
- H200 SXM: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense bf16, 700 W).
- B200 (HGX): NVIDIA HGX B200 datasheet (180 GB HBM3e, 7.7 TB/s, 4.5 PFLOP/s bf16 with
  sparsity = 2250 dense, 1000 W).
Datasheets give no price: A100 and H100 are priced like their export variants A800 and H800
(same silicon); H200 (6.0) and B200 (9.0) are assumptions. Override them in a user file.

Per-GPU scale-out network bandwidth (``net_gb_per_s``) is a deployment input; the defaults
are the paper's clusters (H20 node: 4x400 Gb/s NICs per 8 GPUs = 25 GB/s per GPU; L40S node:
2x400 Gb/s per 8 GPUs = 12.5 GB/s; Ampere: 8x200 Gb/s per 8 GPUs = 25 GB/s) and one 400 Gb/s
NIC per GPU (50 GB/s) for H800/H100/H200/B200. ``intra_gb_per_s`` is the NVLink (or PCIe Gen4
x16, 32 GB/s) bandwidth used by tensor parallelism inside a node.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class GPU:
    name: str
    price_rel: float  # relative price, L20 = 1.00
    memory_gb: float
    mem_bw_gb_per_s: float
    bf16_tflops: float  # dense
    power_w: float
    net_gb_per_s: float  # scale-out network per GPU (A2E/E2A links)
    intra_gb_per_s: float  # NVLink / PCIe per GPU (tensor-parallel all-reduce)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not value > 0:
                raise ValueError(f"GPU {self.name!r}: {f.name} must be > 0, got {value}")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


_CATALOG = (
    # name, price_rel, memory_gb, mem_bw_gb_per_s, bf16_tflops, power_w, net_gb_per_s, intra_gb_per_s
    ("L20", 1.00, 48, 864, 119.5, 275, 12.5, 32),
    ("H800", 5.28, 80, 3430.4, 989, 700, 50, 400),
    ("A800", 2.26, 80, 2039, 312, 400, 25, 400),
    ("H20", 1.85, 96, 4096, 148, 400, 25, 900),
    ("L40S", 1.08, 48, 864, 362, 350, 12.5, 32),
    ("A100-80GB", 2.26, 80, 2039, 312, 400, 25, 600),
    ("H100", 5.28, 80, 3350, 989, 700, 50, 900),
    ("H200", 6.00, 141, 4800, 989, 700, 50, 900),
    ("B200", 9.00, 180, 7700, 2250, 1000, 50, 1800),
)

CATALOG: dict[str, GPU] = {row[0]: GPU(*row) for row in _CATALOG}


def load_user_gpus(path: str, base: dict[str, GPU] | None = None) -> dict[str, GPU]:
    """The catalog with the GPUs of a user file added or overridden.

    The file (JSON, or TOML when it ends in ``.toml``) maps GPU names to fields of ``GPU``::

        {"MyGPU": {"price_rel": 1.2, "memory_gb": 64, "mem_bw_gb_per_s": 1600,
                   "bf16_tflops": 400, "power_w": 450, "net_gb_per_s": 25, "intra_gb_per_s": 64},
         "H20": {"price_rel": 1.7}}

    An entry naming a known GPU overrides only the fields it gives (e.g. a new price).
    """
    with open(path, "rb") as f:
        data = tomllib.load(f) if path.endswith(".toml") else json.loads(f.read())
    catalog = dict(CATALOG if base is None else base)
    known = {f.name for f in fields(GPU)} - {"name"}
    for name, spec in data.items():
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"{path}: GPU {name!r} has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        old = _find(catalog, name)
        if old is not None:
            catalog[old.name] = replace(old, **spec)
        else:
            missing = known - set(spec)
            if missing:
                raise ValueError(f"{path}: new GPU {name!r} needs fields {sorted(missing)}")
            catalog[name] = GPU(name=name, **spec)
    return catalog


def get_gpu(name: str, catalog: dict[str, GPU] | None = None) -> GPU:
    """A catalog GPU by name, case-insensitively; the error lists the known names."""
    catalog = CATALOG if catalog is None else catalog
    gpu = _find(catalog, name)
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(catalog)} (add yours with --gpu-file)")
    return gpu


def load_catalog(path: str | None = None) -> dict[str, GPU]:
    """The built-in catalog, plus the GPUs of the user file ``path`` when given."""
    return load_user_gpus(path) if path else dict(CATALOG)


def _find(catalog: dict[str, GPU], name: str) -> GPU | None:
    for key, gpu in catalog.items():
        if key.lower() == name.lower():
            return gpu
    return None
