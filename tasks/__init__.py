"""Mailroom's Celery side: the app, the queues, the tasks, and the queue helpers."""

from tasks.monitoring import get_active_tasks, get_queue_stats, get_task_status, revoke_task

__all__ = ["get_active_tasks", "get_queue_stats", "get_task_status", "revoke_task"]
