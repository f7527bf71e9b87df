"""gf-dit: elastic serving of diffusion transformers on group-free collectives.

Importing the package is light (no torch): it exposes the pure-Python scheduling core. Models, workers
and the server live in submodules that are imported explicitly.
"""

from gfdit.cost import AnalyticCostModel, CostModel, ModelProfile, get_profile, register_model
from gfdit.layout import (
    Layout,
    LayoutKind,
    ReshardPlan,
    Transfer,
    choose_ranks_for_reuse,
    order_ranks_for_reuse,
    plan_reshard,
)
from gfdit.policy import (
    Assignment,
    Policy,
    PolicySpecError,
    RunnableTask,
    RunningTask,
    SchedulerView,
    available_policies,
    make_policy,
    register_policy,
)
from gfdit.request import Request, RequestState
from gfdit.scheduler import PolicyError, RequestRecord, Scheduler
from gfdit.sim import SimResult, simulate
from gfdit.tasks import Task, TaskKind, TaskTimings, make_trajectory

__all__ = [
    "AnalyticCostModel",
    "Assignment",
    "CostModel",
    "Layout",
    "LayoutKind",
    "ModelProfile",
    "Policy",
    "PolicyError",
    "PolicySpecError",
    "Request",
    "RequestRecord",
    "RequestState",
    "ReshardPlan",
    "RunnableTask",
    "RunningTask",
    "Scheduler",
    "SchedulerView",
    "SimResult",
    "Task",
    "TaskKind",
    "TaskTimings",
    "Transfer",
    "available_policies",
    "choose_ranks_for_reuse",
    "get_profile",
    "make_policy",
    "make_trajectory",
    "order_ranks_for_reuse",
    "plan_reshard",
    "register_model",
    "register_policy",
    "simulate",
]
