"""gptforge.data"""
