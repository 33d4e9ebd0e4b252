"""Profile files (what ``afdserve profile`` measures) and where the planner's k's come from.

Format (JSON)::

    {"version": 1, "device": "NVIDIA H20", "gpu": "H20", "dtype": "bfloat16",
     "models": {"Mixtral-8x22B": {
         "attn":   {"1": {"k1_s_per_token": .., "k1_s_per_token_ctx": .., "k2_s": ..}, "2": {..}},
         "expert": {"1": {"k3_s_per_token": .., "k4_s_per_expert": .., "overhead_s": ..}},
         "route":  {"1": {"s_per_token": .., "s": ..}, "2": {..}}}},
     "comm": {"backend": "nccl", "link_gb_per_s": 23.1, "util_curve": [[1024, 0.04], [4096, 0.12], ..]},
     "meta": {...}}

``gpu`` names the catalog entry the numbers apply to; keys under "attn"/"expert" are tensor-
parallel sizes, under "route" (optional) numbers of expert groups. Coefficients are per layer
per micro-batch (see ``perf_model``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from afdserve.planner.hardware import GPU
from afdserve.planner.models import MoEShape
from afdserve.planner.perf_model import (
    DEFAULT_UTIL_CURVE,
    AttnCoeffs,
    Efficiency,
    ExpertCoeffs,
    RouteCoeffs,
    UtilCurve,
    roofline_attn_coeffs,
    roofline_expert_coeffs,
)

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    device: str  # what torch reported, e.g. "NVIDIA H20" or "cpu"
    gpu: str  # catalog name the numbers apply to
    dtype: str = "bfloat16"
    attn: dict[str, dict[int, AttnCoeffs]] = field(default_factory=dict)  # model -> tp -> coeffs
    expert: dict[str, dict[int, ExpertCoeffs]] = field(default_factory=dict)
    util_curve: UtilCurve | None = None
    link_gb_per_s: float | None = None
    comm_backend: str | None = None
    meta: dict = field(default_factory=dict)
    route: dict[str, RouteCoeffs] = field(default_factory=dict)  # model -> the attention side's row split


def profile_to_dict(p: Profile) -> dict:
    models = {}
    for name in sorted(set(p.attn) | set(p.expert) | set(p.route)):
        models[name] = {role: {str(tp): _coeff_dict(c) for tp, c in sorted(table.get(name, {}).items())}
                        for role, table in (("attn", p.attn), ("expert", p.expert))}
        if name in p.route:
            models[name]["route"] = {str(g): {"s_per_token": tok, "s": call}
                                     for g, tok, call in p.route[name].by_groups}
    out = {"version": PROFILE_VERSION, "device": p.device, "gpu": p.gpu, "dtype": p.dtype, "models": models}
    if p.util_curve is not None:
        out["comm"] = {"backend": p.comm_backend, "link_gb_per_s": p.link_gb_per_s,
                       "util_curve": [list(pt) for pt in p.util_curve]}
    out["meta"] = p.meta
    return out


def profile_from_dict(d: dict) -> Profile:
    if d.get("version") != PROFILE_VERSION:
        raise ValueError(f"profile version {d.get('version')!r} is not supported (expected {PROFILE_VERSION})")
    attn = {name: {int(tp): AttnCoeffs(**c, source="profile") for tp, c in m.get("attn", {}).items()}
            for name, m in d.get("models", {}).items()}
    expert = {name: {int(tp): ExpertCoeffs(**c, source="profile") for tp, c in m.get("expert", {}).items()}
              for name, m in d.get("models", {}).items()}
    route = {name: RouteCoeffs(tuple(sorted((int(g), float(c["s_per_token"]), float(c["s"]))
                                            for g, c in m["route"].items())))
             for name, m in d.get("models", {}).items() if m.get("route")}
    comm = d.get("comm") or {}
    curve = tuple((float(x), float(u)) for x, u in comm["util_curve"]) if comm.get("util_curve") else None
    return Profile(d["device"], d["gpu"], d.get("dtype", "bfloat16"), attn, expert, curve,
                   comm.get("link_gb_per_s"), comm.get("backend"), d.get("meta", {}), route)


def save_profile(path: str, p: Profile) -> None:
    with open(path, "w") as f:
        json.dump(profile_to_dict(p), f, indent=2)
        f.write("\n")


def load_profile(path: str) -> Profile:
    with open(path) as f:
        return profile_from_dict(json.load(f))


@dataclass(frozen=True)
class CoeffSource:
    """Coefficients from profiles where measured, else from a roofline of the catalog GPU.

    A profile measured at another tensor-parallel size of the same GPU and model is scaled
    by tp_measured / tp (ideal scaling; source says so).
    """

    profiles: tuple[Profile, ...] = ()
    efficiency: Efficiency = Efficiency()

    def attn(self, shape: MoEShape, gpu: GPU, tp: int) -> AttnCoeffs:
        found = self._lookup("attn", shape, gpu, tp)
        if found is None:
            return roofline_attn_coeffs(shape, gpu, tp, self.efficiency)
        c, tp0 = found
        if tp0 == tp:
            return replace(c, source="profile")
        r = tp0 / tp
        return AttnCoeffs(c.k1_s_per_token * r, c.k1_s_per_token_ctx * r, c.k2_s * r, f"profile tp={tp0} scaled")

    def expert(self, shape: MoEShape, gpu: GPU, tp: int) -> ExpertCoeffs:
        found = self._lookup("expert", shape, gpu, tp)
        if found is None:
            return roofline_expert_coeffs(shape, gpu, tp, self.efficiency)
        c, tp0 = found
        if tp0 == tp:
            return replace(c, source="profile")
        r = tp0 / tp
        return ExpertCoeffs(c.k3_s_per_token * r, c.k4_s_per_expert * r, c.overhead_s, f"profile tp={tp0} scaled")

    def route(self, shape: MoEShape, gpu: GPU) -> RouteCoeffs:
        """The measured cost of splitting rows by expert group on this GPU, or none."""
        for p in self.profiles:
            if shape.name in p.route and p.gpu.lower() == gpu.name.lower():
                return p.route[shape.name]
        return RouteCoeffs()

    def link_gb_per_s(self, gpu: GPU) -> float | None:
        """The transport's measured rate on this GPU type (the profile's utilisation curve is
        relative to it), or None when no profile of that GPU measured one."""
        for p in self.profiles:
            if p.link_gb_per_s and p.gpu.lower() == gpu.name.lower():
                return p.link_gb_per_s
        return None

    def util_curve(self) -> UtilCurve:
        for p in self.profiles:
            if p.util_curve:
                return p.util_curve
        return DEFAULT_UTIL_CURVE

    def _lookup(self, role: str, shape: MoEShape, gpu: GPU, tp: int):
        for p in self.profiles:
            table = getattr(p, role).get(shape.name, {})
            if p.gpu.lower() != gpu.name.lower() or not table:
                continue
            tp0 = tp if tp in table else min(table, key=lambda t: abs(t - tp))
            return table[tp0], tp0
        return None


def _coeff_dict(c) -> dict:
    d = asdict(c)
    d.pop("source")
    return d
