"""Cluster shapes the planner knows, and ``load_cluster`` for a user's own (``--cluster FILE``).

A shape is one node type: its devices (memory, dense peak FLOP/s, memory bandwidth, how close
kernels get to the peak), the links inside a node (NVLink, as NCCL's achieved bus bandwidth) and
between nodes (NICs per node × line rate × NCCL's achieved fraction), the host (memory, PCIe, the
bandwidth CPU Adam streams the optimizer state at) and the runtime's fixed costs. Every number
says where it comes from; "assumed" marks a judgement, "fitted" a value fitted to a published
record (docs/PLANNER.md has the table it was fitted on and the one it was checked on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.errors import ConfigError

GIB = 1024**3
MIB = 1024**2
GB = 1000**3

# Dense (no sparsity) peak TFLOP/s by device-name fragment and precision, from NVIDIA's
# datasheets (B200 HGX, H100/H200 SXM, A100 SXM). Also what launcher/run/throughput.py divides
# by for MFU.
GPU_PEAK_TFLOPS = {"B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0},
                   "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                   "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                   "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


@dataclass(frozen=True)
class ClusterShape:
    name: str
    device: str  # "gpu" or "cpu" (one training process per device)
    memory_bytes: int  # per device
    dtype: str  # what the planner trains in by default: bf16 on GPUs, fp32 on CPU
    peak_tflops: float  # dense, for ``dtype``
    gemm_efficiency: float  # fraction of peak that large GEMMs reach within a training step
    attention_efficiency: float  # fraction of peak flash attention reaches
    memory_gbps: float  # achieved device memory bandwidth, GB/s
    nvlink_gbps: float  # achieved bus bandwidth of a collective inside a node, GB/s per device
    gpus_per_node: int  # the default for --gpus-per-node
    nics_per_node: int  # network cards for the collectives between nodes
    nic_gbps: float  # line rate of one NIC per direction, GB/s
    network_efficiency: float  # NCCL's achieved fraction of the NICs' line rate
    host_memory_bytes: int  # per node
    pcie_gbps: float  # achieved host <-> device copy bandwidth per device, GB/s
    host_adam_gbps: float  # bytes/s (GB/s) CPU Adam streams through per node (offload)
    runtime_bytes: int  # memory the runtime holds before any model tensor exists
    fragmentation: float  # allocator overhead as a fraction of the tensor bytes
    launch_s_per_layer: float  # host time to issue one layer's kernels, forward + backward
    microbatch_overhead_s: float = 0.0  # fixed host cost of one micro-batch through the schedule

    @property
    def node_network_gbps(self) -> float:
        """What the node's NICs move together, per direction, in NCCL's collectives."""
        return self.nics_per_node * self.nic_gbps * self.network_efficiency


# Shared by the GPU shapes.
_GPU_RUNTIME = 2 * GIB  # assumed: CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers
_GPU_FRAGMENTATION = 0.10  # assumed: PyTorch's caching allocator reserves ~5-15% above live bytes
# fitted: the one free constant of the compute model, on Narayanan et al. 2021 Table 1 (A100,
# 10 runs, 1.7B-1T); checked on Korthikanti et al. 2022 (4 runs, not used in the fit)
_A100_GEMM = 0.74
# assumed: cuBLAS reaches a smaller fraction of the H100's larger peak on large bf16 GEMMs
# (~700 of 989 TFLOP/s against ~270 of 312 on an A100); the A100 fit scaled by that ratio
_H100_GEMM = round(_A100_GEMM * (700 / 989) / (270 / 312), 2)
# FlashAttention-2 forward + backward, causal, head dim 128 (Dao 2023, "FlashAttention-2",
# figures 5-7): 187-225 of 312 TFLOP/s on an A100, ~335 of 989 on an H100 (newer kernels reach
# more on Hopper; taken as 0.4 there, assumed)
_FLASH_A100, _FLASH_HOPPER = 0.6, 0.4
_NCCL_NET = 0.86  # measured by NCCL: ~86 of 100 GB/s all-reduce bus bandwidth, 4 HDR NICs, 8 GPUs
_MEMORY = 0.85  # assumed: streaming kernels reach ~85% of the HBM datasheet bandwidth
# assumed: megatron's layer issues ~75 kernels forward + backward at ~4 us of host time each
_GPU_LAUNCH = 300e-6


def _gpu(name, *, memory_bytes, peak, gemm, hbm_gbps, nvlink_gbps, nic_gbps, host_memory_bytes,
         pcie_gbps, host_adam_gbps, flash=_FLASH_HOPPER):
    return ClusterShape(
        name=name, device="gpu", memory_bytes=memory_bytes, dtype="bf16", peak_tflops=peak,
        gemm_efficiency=gemm, attention_efficiency=flash, memory_gbps=hbm_gbps * _MEMORY,
        nvlink_gbps=nvlink_gbps, gpus_per_node=8, nics_per_node=8, nic_gbps=nic_gbps,
        network_efficiency=_NCCL_NET, host_memory_bytes=host_memory_bytes, pcie_gbps=pcie_gbps,
        host_adam_gbps=host_adam_gbps, runtime_bytes=_GPU_RUNTIME,
        fragmentation=_GPU_FRAGMENTATION, launch_s_per_layer=_GPU_LAUNCH)


CLUSTERS: dict[str, ClusterShape] = {
    # HGX/DGX B200: 180 GB HBM3e per GPU (1.44 TB per 8), 8 TB/s; NVLink 5 900 GB/s per
    # direction (assumed 80% in NCCL); 8 x 400 Gb/s ConnectX-7; 2 TB host; PCIe Gen5
    "b200-180gb": _gpu("b200-180gb", memory_bytes=180 * GB, peak=GPU_PEAK_TFLOPS["B200"]["bf16"],
                       gemm=_H100_GEMM, hbm_gbps=8000, nvlink_gbps=720.0, nic_gbps=50.0,
                       host_memory_bytes=2048 * GIB, pcie_gbps=50.0, host_adam_gbps=300.0),
    # DGX H200: 141 GB HBM3e (nvidia-smi memory.total 143771 MiB), 4.8 TB/s; otherwise an H100
    "h200-141gb": _gpu("h200-141gb", memory_bytes=143771 * MIB,
                       peak=GPU_PEAK_TFLOPS["H200"]["bf16"], gemm=_H100_GEMM, hbm_gbps=4800,
                       nvlink_gbps=360.0, nic_gbps=50.0, host_memory_bytes=2048 * GIB,
                       pcie_gbps=50.0, host_adam_gbps=300.0),
    # DGX H100: 81559 MiB (nvidia-smi), 3.35 TB/s; NVLink 4 450 GB/s per direction, ~360 GB/s
    # all-reduce bus bandwidth in nccl-tests; 8 x 400 Gb/s NDR; 2 TB host (DDR5, assumed
    # ~300 GB/s for CPU Adam); PCIe Gen5 x16 ~50 GB/s achieved
    "h100-80gb": _gpu("h100-80gb", memory_bytes=81559 * MIB, peak=GPU_PEAK_TFLOPS["H100"]["bf16"],
                      gemm=_H100_GEMM, hbm_gbps=3350, nvlink_gbps=360.0, nic_gbps=50.0,
                      host_memory_bytes=2048 * GIB, pcie_gbps=50.0, host_adam_gbps=300.0),
    # DGX A100 640GB: 81920 MiB, 2.04 TB/s; NVLink 3 300 GB/s per direction, ~230 GB/s in
    # nccl-tests; 8 x 200 Gb/s HDR; 2 TB host (DDR4, assumed ~200 GB/s); PCIe Gen4 ~25 GB/s
    "a100-80gb": _gpu("a100-80gb", memory_bytes=81920 * MIB, peak=GPU_PEAK_TFLOPS["A100"]["bf16"],
                      gemm=_A100_GEMM, hbm_gbps=2039, nvlink_gbps=230.0, nic_gbps=25.0,
                      host_memory_bytes=2048 * GIB, pcie_gbps=25.0, host_adam_gbps=200.0,
                      flash=_FLASH_A100),
    # DGX A100 320GB: 40960 MiB, 1.56 TB/s, 1 TB host; otherwise as a100-80gb
    "a100-40gb": _gpu("a100-40gb", memory_bytes=40960 * MIB, peak=GPU_PEAK_TFLOPS["A100"]["bf16"],
                      gemm=_A100_GEMM, hbm_gbps=1555, nvlink_gbps=230.0, nic_gbps=25.0,
                      host_memory_bytes=1024 * GIB, pcie_gbps=25.0, host_adam_gbps=200.0,
                      flash=_FLASH_A100),
    "cpu": ClusterShape(
        name="cpu", device="cpu",
        # assumed: a third of the 24 GiB development host per rank (two ranks, room for the OS)
        memory_bytes=8 * GIB, dtype="fp32",
        # measured on the 2-core development host: a 1024^3 fp32 matmul with one thread
        # (torchrun gives each rank OMP_NUM_THREADS=1) runs at ~46 GFLOP/s
        peak_tflops=0.046,
        gemm_efficiency=0.8,  # assumed: the peak above is itself a large GEMM's rate
        attention_efficiency=0.3,  # assumed: SDPA's math path on CPU
        memory_gbps=5.0,  # assumed: one thread's streaming bandwidth
        # assumed: gloo over loopback TCP moves ~1 GB/s; there is no second node
        nvlink_gbps=1.0, gpus_per_node=2, nics_per_node=1, nic_gbps=1.0, network_efficiency=1.0,
        host_memory_bytes=24 * GIB, pcie_gbps=1e9, host_adam_gbps=5.0,
        # measured: a rank's resident memory after importing torch and megatron-core and
        # creating its process groups, before the model (docs/PLANNER.md, calibration)
        runtime_bytes=450 * MIB,
        fragmentation=0.05,  # assumed: glibc keeps some freed memory in its arenas
        # assumed: megatron's layer in Python, ~1 ms of host time forward + backward on CPU
        launch_s_per_layer=1e-3,
        # measured: the tiny preset in one process steps in 20 ms as 1 micro-batch of 8 and in
        # 44 ms as 8 of 1 (~3 ms per extra micro-batch)
        microbatch_overhead_s=0.003),
}

_FIELDS = {f.name: f for f in dataclasses.fields(ClusterShape)}
_NUMBER = (int, float)


def _typed(path: Path, key: str, value, default):
    """``value`` as the type of the preset field ``default`` (ints may be given as floats)."""
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key}", f"must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise ConfigError(f"{path}: {key}", f"must be a number, got {value!r}")
    if value < 0 or (value == 0 and key not in ("microbatch_overhead_s", "launch_s_per_layer",
                                                  "fragmentation", "runtime_bytes")):
        raise ConfigError(f"{path}: {key}", f"must be > 0, got {value!r}")
    if isinstance(default, int):
        if float(value) != int(value):
            raise ConfigError(f"{path}: {key}", f"must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def load_cluster(path: str | Path) -> ClusterShape:
    """A cluster shape from YAML: ``base: PRESET`` plus any fields to change, or every field.

    Memory may be given as ``memory_gib`` / ``host_memory_gib`` instead of bytes.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("--cluster", f"no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("--cluster", f"{path} must hold a mapping of fields")
    data = dict(data)
    for gib_key, byte_key in (("memory_gib", "memory_bytes"),
                              ("host_memory_gib", "host_memory_bytes")):
        if gib_key in data:
            data[byte_key] = int(_typed(path, gib_key, data.pop(gib_key), 1.0) * GIB)
    base_name = data.pop("base", None)
    if base_name is not None and base_name not in CLUSTERS:
        raise ConfigError(f"{path}: base", f"unknown shape {base_name!r} (known: "
                                           f"{', '.join(CLUSTERS)})")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}", f"unknown field (fields: "
                                                   f"{', '.join(_FIELDS)}, memory_gib, "
                                                   f"host_memory_gib, base)")
    base = CLUSTERS[base_name] if base_name else None
    if base is None:
        missing = [k for k, f in _FIELDS.items()
                   if k not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{path}: {missing[0]}", "missing (give every field, or "
                                                       "`base: PRESET` and the ones to change)")
    reference = base or CLUSTERS["h100-80gb"]
    values = {k: _typed(path, k, v, getattr(reference, k)) for k, v in data.items()}
    if values.get("device", reference.device) not in ("gpu", "cpu"):
        raise ConfigError(f"{path}: device", f"must be gpu or cpu, got {values['device']!r}")
    values.setdefault("name", path.stem)
    return dataclasses.replace(base, **values) if base else ClusterShape(**values)


def cluster_shape(name_or_path: str) -> ClusterShape:
    """A preset by name, else a YAML file."""
    if name_or_path in CLUSTERS:
        return CLUSTERS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_cluster(name_or_path)
    raise ConfigError("--gpu", f"unknown cluster shape {name_or_path!r} (known: "
                               f"{', '.join(CLUSTERS)}, or a YAML file)")
