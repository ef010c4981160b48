"""gptforge.common

What every part may import: the user-error base, durable writes, metrics.jsonl, logging, the
process's end (shutdown).
"""
