"""gptforge.model"""
