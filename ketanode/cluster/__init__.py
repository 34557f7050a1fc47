"""Cluster mode (issue 16): the stages of the node run apart, on PostgreSQL and RabbitMQ.

``engine``: the Celery application, the work queue and publishing a job id; ``tasks``: the
Celery task that runs one job (the process side); ``publisher``: the active scheduler's
loop that sends queued job ids to the broker; ``leader``: which scheduler is the active
one (a PostgreSQL advisory lock); ``members``: heartbeat rows of the role processes and
``ketanode cluster status``. The roles are wired in ``ketanode/node.py``.
"""
