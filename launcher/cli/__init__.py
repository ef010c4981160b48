"""gptforge.launcher.cli

The `gptforge` command: one module per verb (thin: parse, then call a part).
"""
