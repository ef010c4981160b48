"""gptforge.parallel.deepspeed

The DeepSpeed ZeRO engine, its generated JSON, ZeRO -> fp32, compat.
"""
