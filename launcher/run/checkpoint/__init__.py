"""gptforge.launcher.run.checkpoint

Checkpoints: the on-disk format, saving, resuming, retention.
"""
