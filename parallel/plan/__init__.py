"""gptforge.parallel.plan

The planner: layouts, memory, step time, cluster shapes, parameter counts.
"""
