"""gptforge.launcher.modelio

Models outside training: inference loading, Hugging Face folders.
"""
