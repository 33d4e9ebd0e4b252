"""Deployment planner (DESIGN.md §7): hardware catalog, model shapes, a profile-calibrated
performance model, and the search of the paper's Algorithm 1 over AFD plans.

    from afdserve.planner import PlanRequest, get_gpu, load_shape
        res = search(PlanRequest(load_shape("Mixtral-8x22B"), (get_gpu("H20"),), (get_gpu("L40S"),),
                             slo_s=0.150, avg_seq_len=730))
    res.plans[0]   # the best plan by throughput per unit cost
"""

from afdserve.planner.core import Plan, PlanRequest, Rejection, SearchResult, SearchSpace
from afdserve.planner.hardware import CATALOG, GPU, get_gpu, load_catalog, load_user_gpus
from afdserve.planner.models import PRESETS, MoEShape, load_shape, shape_from_hf_config
from afdserve.planner.plan_file import load_plan, plan_to_dict, write_plan
from afdserve.planner.profile import CoeffSource, Profile, load_profile, save_profile

__all__ = ["Plan", "PlanRequest", "Rejection", "SearchResult", "SearchSpace", "CATALOG", "GPU", "get_gpu",
           "load_catalog", "load_user_gpus", "PRESETS", "MoEShape", "load_shape", "shape_from_hf_config",
           "load_plan", "plan_to_dict", "write_plan", "CoeffSource", "Profile", "load_profile", "save_profile"]
# search is not imported here: it needs the simulator, which needs the modules above
