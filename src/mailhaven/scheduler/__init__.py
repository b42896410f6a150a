"""The queue manager: pure policy (`backoff`, `plan`, `outcome`) and the async `runner`."""

from mailhaven.scheduler.backoff import BackoffPolicy
from mailhaven.scheduler.plan import Limits
from mailhaven.scheduler.ports import OnFailures, SchedulerSpool
from mailhaven.scheduler.runner import Runner

__all__ = ["BackoffPolicy", "Limits", "OnFailures", "Runner", "SchedulerSpool"]
