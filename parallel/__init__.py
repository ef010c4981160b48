"""gptforge.parallel"""
