"""gptforge.launcher.run

One rank's training run: entry, the loop, checkpoints, metrics, throughput.
"""
