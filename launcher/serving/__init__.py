"""gptforge.launcher.serving

``gptforge serve``: an OpenAI-compatible completions server over a model at any layout (the
request schema, the batching generation worker and its followers on the other ranks, the HTTP
app).
"""
