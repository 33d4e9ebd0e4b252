"""Plain-text tables of plans, baselines and what memory ruled out."""

from __future__ import annotations

from itertools import groupby

from afdserve.planner.core import Plan, Rejection, SearchResult

_HEAD = (f"{'#':>2} {'attn':>10} {'expert':>11} {'m':>2} {'b_a':>5} {'B':>6} {'GPUs':>4} {'T_a ms':>7} "
         f"{'T_e ms':>7} {'T_c ms':>7} {'TBT ms':>7} {'tok/s':>8} {'tok/s/GPU':>9} {'tok/s/cost':>10}  notes")


def plan_row(i: int, p: Plan) -> str:
    attn = f"{p.n_a}x{p.attn_gpu}/tp{p.tp_a}"
    expert = {"afd": f"{p.n_e}x{p.expert_gpu}/tp{p.tp_e}", "colocated": "(EP, same)"}.get(p.layout, "(TP, same)")
    notes = [f"{p.limited_by}-bound"]
    failed = [k for k, ok in p.conditions.items() if not ok]
    if failed:
        notes.append("not " + ",".join(failed))
    return (f"{i:>2} {attn:>10} {expert:>11} {p.m:>2} {p.b_a:>5} {p.global_batch:>6} {p.num_gpus:>4} "
            f"{p.t_a_s * 1e3:>7.3f} {p.t_e_s * 1e3:>7.3f} {p.t_c_s * 1e3:>7.3f} {p.step_s * 1e3:>7.1f} "
            f"{p.throughput_tok_s:>8.0f} {p.tok_s_per_gpu:>9.1f} {p.tok_s_per_cost:>10.1f}  {'; '.join(notes)}")


def plans_table(plans: list[Plan]) -> str:
    return "\n".join([_HEAD] + [plan_row(i + 1, p) for i, p in enumerate(plans)])


def rejections_summary(rejections: list[Rejection]) -> list[str]:
    """One line per (role, GPU, tp): what the memory (or divisibility, or SLO) constraint ruled out."""
    lines = []
    key = lambda r: (r.role, r.gpu, r.tp)  # noqa: E731
    for (role, gpu, tp), group in groupby(sorted(rejections, key=key), key=key):
        items = list(group)
        what = ", ".join(r.what for r in items)
        lines.append(f"{role:>9} {gpu}/tp{tp}: {what}: {items[0].reason}" if len(items) == 1 else
                     f"{role:>9} {gpu}/tp{tp}: {what}: e.g. {items[0].reason}")
    return lines


def search_report(res: SearchResult, elapsed_s: float) -> str:
    lines = [f"AFD plans (best {len(res.plans)} by throughput per unit cost; "
             f"{res.candidates} candidates bounded, {res.simulated} simulations, {elapsed_s:.2f} s):",
             plans_table(res.plans) if res.plans else "  none meets the SLO and memory limits", "",
             "Colocated baselines (attention and experts on the same GPUs, m = 1; TP: one tensor-parallel group "
             "holding every expert; EP: one process per GPU, data-parallel attention, experts split):",
             plans_table(res.baselines) if res.baselines else "  none fits"]
    if res.plans and res.baselines:
        best, base = res.plans[0], res.baselines[0]
        lines.append(f"\nbest AFD vs best colocated: {best.tok_s_per_cost / base.tok_s_per_cost:.2f}x "
                     f"throughput per cost, {best.tok_s_per_gpu / base.tok_s_per_gpu:.2f}x per GPU")
    if res.rejections:
        lines += ["", "Ruled out:"] + ["  " + s for s in rejections_summary(res.rejections)]
    return "\n".join(lines)
