"""gptforge.parallel.megatron

The megatron-core engine, its checkpoints, upstream fixes, CPU compatibility.
"""
