"""gptforge.launcher.tracking

Experiment tracking: the MLflow outbox and sender, the report PNG.
"""
