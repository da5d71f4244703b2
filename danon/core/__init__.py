"""danon.core, the floor: the attention op, the plan and its builders, one per family (DESIGN.md sections 2-3).

It imports only torch; every other layer (kernels, passes, backends, the user API) imports it.
"""
from .dala import alibi_slopes, dala_plan
from .exact import exact_plan
from .msra import auto_levels, msra_plan
from .plan import Plan, plan_coverage
from .ucsa import ucsa_plan

__all__ = ["Plan", "plan_coverage", "exact_plan", "ucsa_plan", "msra_plan", "dala_plan", "alibi_slopes", "auto_levels"]
