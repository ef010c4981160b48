"""Cluster shapes the planner knows: per-device memory, dense peak FLOP/s, link bandwidths.

Every number states where it comes from; "assumed" marks a judgement, not a measurement.
Bandwidths are what one device can push per direction in a collective (bus bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2

# Dense (no sparsity) peak TFLOP/s by device-name fragment and precision, from NVIDIA's
# datasheets (H100/H200 SXM, A100 SXM). Also what launcher/run/throughput.py divides by for MFU.
GPU_PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                   "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                   "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


@dataclass(frozen=True)
class ClusterShape:
    name: str
    device: str  # "gpu" or "cpu" (one training process per device)
    memory_bytes: int  # per device
    dtype: str  # what the planner trains in: bf16 on GPUs, fp32 on CPU
    peak_tflops: float  # dense, for ``dtype``
    achievable_fraction: float  # of peak, for the whole forward/backward compute
    intra_node_gbps: float  # GB/s per device per direction inside a node
    inter_node_gbps: float  # GB/s per device per direction between nodes
    runtime_bytes: int  # memory the runtime holds before any model tensor exists
    fragmentation: float  # allocator overhead as a fraction of the tensor bytes
    microbatch_overhead_s: float = 0.0  # fixed cost of one micro-batch through the schedule


# Shared by the GPU shapes.
_GPU_RUNTIME = 2 * GIB  # assumed: CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers
_GPU_FRAGMENTATION = 0.10  # assumed: PyTorch's caching allocator reserves ~5-15% above live bytes
# assumed: large bf16 GEMMs reach ~0.8 of peak (8192^3 measured at ~800 TFLOP/s on an H100);
# attention, norms, elementwise kernels and smaller shapes bring the whole step's compute to ~0.6
_GPU_ACHIEVABLE = 0.6

CLUSTERS: dict[str, ClusterShape] = {
    "h100-80gb": ClusterShape(
        name="h100-80gb", device="gpu",
        memory_bytes=81559 * MIB,  # nvidia-smi memory.total of an H100 SXM5 80GB
        dtype="bf16", peak_tflops=GPU_PEAK_TFLOPS["H100"]["bf16"],
        achievable_fraction=_GPU_ACHIEVABLE,
        # NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction; assumed 80% in NCCL rings
        intra_node_gbps=360.0,
        # DGX H100: one 400 Gb/s NDR InfiniBand port per GPU = 50 GB/s; assumed 80% achieved
        inter_node_gbps=40.0,
        runtime_bytes=_GPU_RUNTIME, fragmentation=_GPU_FRAGMENTATION),
    "a100-80gb": ClusterShape(
        name="a100-80gb", device="gpu",
        memory_bytes=81920 * MIB,  # nvidia-smi memory.total of an A100 SXM4 80GB
        dtype="bf16", peak_tflops=GPU_PEAK_TFLOPS["A100"]["bf16"],
        achievable_fraction=_GPU_ACHIEVABLE,
        # NVLink 3: 600 GB/s bidirectional = 300 GB/s per direction; assumed 80%
        intra_node_gbps=240.0,
        # DGX A100: one 200 Gb/s HDR InfiniBand port per GPU = 25 GB/s; assumed 80%
        inter_node_gbps=20.0,
        runtime_bytes=_GPU_RUNTIME, fragmentation=_GPU_FRAGMENTATION),
    "a100-40gb": ClusterShape(
        name="a100-40gb", device="gpu",
        memory_bytes=40960 * MIB,  # nvidia-smi memory.total of an A100 SXM4 40GB
        dtype="bf16", peak_tflops=GPU_PEAK_TFLOPS["A100"]["bf16"],
        achievable_fraction=_GPU_ACHIEVABLE,
        intra_node_gbps=240.0, inter_node_gbps=20.0,  # as a100-80gb (DGX A100 40GB)
        runtime_bytes=_GPU_RUNTIME, fragmentation=_GPU_FRAGMENTATION),
    "cpu": ClusterShape(
        name="cpu", device="cpu",
        # assumed: a third of the 24 GiB development host per rank (two ranks, room for the OS)
        memory_bytes=8 * GIB,
        dtype="fp32",
        # measured on the 2-core development host: a 1024^3 fp32 matmul with one thread
        # (torchrun gives each rank OMP_NUM_THREADS=1) runs at ~46 GFLOP/s
        peak_tflops=0.046,
        achievable_fraction=0.3,  # assumed: small models on CPU spend much time outside GEMMs
        # assumed: gloo over loopback TCP moves ~1 GB/s; there is no second node
        intra_node_gbps=1.0, inter_node_gbps=1.0,
        # measured: a rank's resident memory after importing torch and megatron-core and
        # creating its process groups, before the model (docs/PLANNER.md, calibration)
        runtime_bytes=450 * MIB,
        fragmentation=0.05,  # assumed: glibc keeps some freed memory in its arenas
        # measured: the tiny preset in one process steps in 20 ms as 1 micro-batch of 8 and in
        # 44 ms as 8 of 1 (~3 ms per extra micro-batch). Not priced on GPUs, where a
        # micro-batch of thousands of tokens runs for tens of milliseconds or more.
        microbatch_overhead_s=0.003),
}

