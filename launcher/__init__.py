"""gptforge.launcher"""
