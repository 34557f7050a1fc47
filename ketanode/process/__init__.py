"""What the node does with a complete series: the worker, the job pipeline, prediction, and the
reports it emits.
"""
