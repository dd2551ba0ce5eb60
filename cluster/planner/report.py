"""Human-readable report of a planning outcome: the plan, its numbers, and why."""

from __future__ import annotations

from .goodput import RateMeasurement
from .phase_goodput import PhaseGoodput
from .placement import layout_plan
from .plans import Plan
from .problem import PlanningProblem
from .search import EvaluatedPlan, PlanOutcome
from .workload import CsvLengths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _measurement(m: RateMeasurement) -> str:
    transfer = f", mean KV transfer {1000 * m.mean_transfer_s:.1f} ms" if m.mean_transfer_s else ""
    return (f"attainment {_pct(m.attainment)} (TTFT missed {_pct(m.ttft_miss)}, TPOT missed "
            f"{_pct(m.tpot_miss)}); mean TTFT {m.mean_ttft_s:.3f} s, mean TPOT "
            f"{1000 * m.mean_tpot_s:.1f} ms{transfer}")


def _layout(plan: Plan, problem: PlanningProblem) -> str:
    c = problem.request.cluster
    layout = layout_plan(plan, c.num_nodes, c.gpus_per_node)
    if layout is None:
        return "(no layout)"
    per_node: dict[int, list[str]] = {}
    for role, nodes_of in (("P", layout.prefill_nodes), ("D", layout.decode_nodes)):
        for i, nodes in enumerate(nodes_of):
            for stage, node in enumerate(nodes):
                tag = f"{role}{i}" + (f".s{stage}" if len(nodes) > 1 else "")
                per_node.setdefault(node, []).append(tag)
    return "; ".join(f"node {n}: {' '.join(tags)}" for n, tags in sorted(per_node.items()))


def _phase(outcome: PlanOutcome, phase: str, plan_config) -> PhaseGoodput:
    return next(g for g in outcome.phases if g.phase == phase and g.config == plan_config)


def _pooled(g: PhaseGoodput) -> str:
    return f"{g.num_pooled}x {g.pooled_goodput_rps:.2f}" if g.num_pooled > 1 else "-"


def _why(e: EvaluatedPlan, outcome: PlanOutcome, problem: PlanningProblem) -> list[str]:
    plan = e.plan
    gp, gd = _phase(outcome, "prefill", plan.prefill), _phase(outcome, "decode", plan.decode)
    slo, unit = problem.request.slo, problem.request.cluster.unit_name
    lines = [
        f"one prefill {plan.prefill.label} instance alone sustains {gp.goodput_rps:.2f} req/s "
        f"within TTFT {slo.ttft_s:g} s ({gp.goodput_per_gpu:.2f}/{unit}); one decode "
        f"{plan.decode.label} instance alone sustains {gd.goodput_rps:.2f} req/s within TPOT "
        f"{slo.tpot_s:g} s ({gd.goodput_per_gpu:.2f}/{unit}, {gd.kv_capacity_tokens} KV tokens)",
        f"{plan.num_prefill}:{plan.num_decode} prefill:decode balances the phases "
        f"({gp.pooled_rps(plan.num_prefill):.2f} vs {gd.pooled_rps(plan.num_decode):.2f} "
        f"req/s by the per-phase estimate, pooling counted); co-simulated together the plan "
        f"reaches {e.goodput_rps:.2f} req/s",
    ]
    if e.beyond is not None:
        lines.append(
            f"what gives first: at {e.beyond.rate:.2f} req/s TTFT misses {_pct(e.beyond.ttft_miss)} "
            f"and TPOT misses {_pct(e.beyond.tpot_miss)} of requests -> limited by {e.limited_by}")
    return lines


def _plan_block(e: EvaluatedPlan, problem: PlanningProblem, outcome: PlanOutcome) -> list[str]:
    unit = problem.request.cluster.unit_name
    lines = [
        f"  goodput      {e.goodput_rps:.2f} req/s  ({e.goodput_per_gpu:.3f} req/s per {unit}, "
        f"{e.plan.num_gpus} {unit}s)",
        f"  at goodput   {_measurement(e.at_goodput)}",
    ]
    if e.at_target is not None and outcome.target_rate is not None:
        lines.append(f"  at {outcome.target_rate:g} req/s  {_measurement(e.at_target)}")
    lines.append(f"  layout       {_layout(e.plan, problem)}"
                 + (f"; front end on its own core(s) 0-{outcome.front_end_cores - 1} "
                    f"({e.plan.num_gpus + outcome.front_end_cores} {unit}s in all)"
                    if outcome.front_end_cores else ""))
    if e.plan.placement == "low_node_affinity":
        lines.append("  routing      pair each prefill only with decode instances on its own node(s)")
    return lines


def _compare(e: EvaluatedPlan, best: EvaluatedPlan, unit: str, problem: PlanningProblem) -> str:
    if best.goodput_per_gpu <= 0:
        return ""
    delta = e.goodput_per_gpu / best.goodput_per_gpu - 1
    text = f"{delta:+.0%} per {unit} vs chosen; limited by {e.limited_by}"
    m = e.beyond or e.at_goodput
    if m.mean_transfer_s > 2 * max(best.at_goodput.mean_transfer_s, 1e-3):
        text += f"; KV transfer {1000 * m.mean_transfer_s:.0f} ms on average ({_links(e.plan, problem)})"
    return text


def _links(plan: Plan, problem: PlanningProblem) -> str:
    """Which links a plan's KV transfers can take: NVLink, the NIC, or both."""
    c = problem.request.cluster
    layout = layout_plan(plan, c.num_nodes, c.gpus_per_node)
    if layout is None:
        return "no layout"
    kinds = set()
    for p, p_nodes in enumerate(layout.prefill_nodes):
        for d, d_nodes in enumerate(layout.decode_nodes):
            if layout.prefill_units[p] == layout.decode_units[d]:
                kinds.add("intra" if set(p_nodes) == set(d_nodes) else "inter")
    intra = "NVLink" if c.device == "gpu" else "shared memory"
    if kinds == {"intra"}:
        return f"{intra}, same node"
    return "inter-node link" if kinds == {"inter"} else f"{intra} or inter-node link, by pairing"


def _front_end_header(outcome: PlanOutcome, problem: PlanningProblem) -> list[str]:
    fe = problem.request.front_end
    if not fe.modelled:
        return []
    where = _where(outcome, "the engines' cores")
    return [f"  front end    {fe.cpu_ms_per_request:g} ms CPU per request + "
            f"{fe.cpu_ms_per_output_token:g} ms per output token; planned {where}"
            + (" (layout auto)" if fe.layout == "auto" else "")]


def _where(o: PlanOutcome, engines: str = "the engines") -> str:
    """Where the outcome's front end runs, in words."""
    if o.front_end_layout == "shared":
        return f"shared with {engines}"
    if o.front_end_layout == "with_prefill":
        return "on the prefill instances' cores (decode alone on its own)"
    return f"on {o.front_end_cores} core(s) of its own"


def layout_summary(o: PlanOutcome, unit: str) -> str:
    where = _where(o)
    if o.serve_colocated:
        top = o.best_colocated
        what = f"colocated {top.label} x{top.num_instances}"
    elif o.best is not None and o.best.goodput_rps > 0:
        what = o.best.plan.label
    else:
        return f"front end {where}: no deployment meets the SLO"
    return (f"front end {where}: {what}, {o.deployment_goodput_rps:.2f} req/s on {o.units} "
            f"{unit}s")


def _front_end_verdict(outcome: PlanOutcome, unit: str) -> list[str]:
    if not outcome.other_layouts:
        return []
    return (["", "Front-end layouts (each planned):", f"  chosen  {layout_summary(outcome, unit)}"]
            + [f"  other   {layout_summary(o, unit)}" for o in outcome.other_layouts])


def render_report(outcome: PlanOutcome, problem: PlanningProblem, elapsed_s: float | None = None) -> str:
    req = problem.request
    c, slo, w = req.cluster, req.slo, req.workload
    lengths = problem.lengths
    unit = c.unit_name
    source = (f"{w.lengths.path.name}" if isinstance(w.lengths, CsvLengths) else w.lengths.kind)
    arrival = ("Poisson" if w.arrival.process == "poisson" else f"gamma (cv {w.arrival.cv:g})")
    out = [
        f"pdserve plan: {req.model} on {c.num_nodes} node(s) x {c.gpus_per_node} {unit}s "
        f"({c.gpu_memory_gib:g} GiB{' of KV cache' if c.device == 'cpu' else ''} each, budget "
        f"{c.gpu_budget} {unit}s)",
        f"  profile      {req.profile} [{problem.profile_model}], TP {sorted(problem.profiles)}"
        + (f", iteration times x{req.engine.iteration_time_scale:g}"
           if req.engine.iteration_time_scale != 1.0 else ""),
        f"  workload     {source}: prompt mean {lengths['input_mean']:.0f}, output mean "
        f"{lengths['output_mean']:.0f} tokens; {arrival} arrivals",
        f"  SLO          TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s for >= "
        f"{_pct(slo.attainment)} of requests (first token from {req.engine.first_token_source})",
        f"  network      {'NVLink' if c.device == 'gpu' else 'shared memory'} "
        f"{c.intra_node_bandwidth_gb_s:g} GB/s per {unit} pair, NIC "
        f"{c.inter_node_bandwidth_gb_s:g} GB/s per node; KV {problem.kv_bytes_per_token / 1e6:.3f} MB/token",
        *_front_end_header(outcome, problem),
        "  objective    " + (f"highest goodput within the {unit} budget" if outcome.objective == "max_goodput"
                            else f"fewest {unit}s sustaining {outcome.target_rate:g} req/s"),
        "",
    ]
    best = outcome.best
    if (best is None or best.goodput_rps <= 0) and outcome.serve_colocated:
        engines = c.gpu_budget - outcome.front_end_cores
        out.append(f"No disaggregated plan meets the SLO on {engines} engine {unit}(s); the "
                   "colocated deployment below does (see the verdict).")
    elif best is None or best.goodput_rps <= 0:
        if outcome.objective == "min_gpus":
            out.append(f"NO PLAN within {c.gpu_budget} {unit}s sustains {outcome.target_rate:g} req/s.")
            if outcome.fallback is not None and outcome.fallback.goodput_rps > 0:
                fb = outcome.fallback
                out.append(f"Best achievable: {fb.plan.label}, {fb.goodput_rps:.2f} req/s "
                           f"on {fb.plan.num_gpus} {unit}s.")
        else:
            out.append(f"NO PLAN within {c.gpu_budget} {unit}s meets the SLO at any request rate. In the "
                       "per-phase table a 0 means one instance cannot meet that SLO even alone (too "
                       "many requests exceed it at zero load); see also the excluded configurations.")
    else:
        out.append(f"Chosen plan: {best.plan.label}")
        out += _plan_block(best, problem, outcome)
        out.append("  why:")
        out += [f"    - {line}" for line in _why(best, outcome, problem)]
        if outcome.runners_up:
            out += ["", "Runner-up plans:"]
            for i, e in enumerate(outcome.runners_up, start=2):
                out.append(f"  #{i} {e.plan.label}: {e.goodput_rps:.2f} req/s on {e.plan.num_gpus} {unit}s "
                           f"({e.goodput_per_gpu:.3f}/{unit}; {_compare(e, best, unit, problem)})")
    out += ["", f"Per-phase goodput of one instance (req/s; per {unit}), and of the most "
                f"instances a plan could hold, routed together:",
            f"  {'config':<10} {'prefill (TTFT)':>18} {'pooled':>14} {'decode (TPOT)':>18} "
            f"{'pooled':>14} {'KV tokens':>10}"]
    configs = sorted({g.config for g in outcome.phases})
    for config in configs:
        gp, gd = _phase(outcome, "prefill", config), _phase(outcome, "decode", config)
        out.append(f"  {config.label:<10} {gp.goodput_rps:>8.2f} ({gp.goodput_per_gpu:>6.2f})  {_pooled(gp):>14} "
                   f"{gd.goodput_rps:>8.2f} ({gd.goodput_per_gpu:>6.2f})  {_pooled(gd):>14} "
                   f"{gd.kv_capacity_tokens:>10}")
    if outcome.excluded:
        out += ["", "Excluded configurations:"]
        out += [f"  {config.label}: {reason}" for config, reason in outcome.excluded]
    if outcome.colocated:
        out += ["", f"Colocated baseline (both SLOs; one instance, then the whole budget of such "
                    f"instances routed together):"]
        out += [f"  {g.config.label:<9} {g.scheduler.replace('_', ' '):<16} one {g.goodput_rps:7.2f} req/s; "
                f"{g.num_instances} instances {g.deployment_goodput_rps:7.2f} req/s "
                f"({g.deployment_goodput_rps / max(g.num_instances * g.tp * g.pp, 1):.3f}/{unit})"
                for g in outcome.colocated]
        top = outcome.best_colocated
        if top is not None:
            if outcome.serve_colocated:
                out.append(f"  VERDICT: serve colocated. {top.label} sustains "
                           f"{top.deployment_goodput_rps:.2f} req/s, more than the best disaggregated "
                           f"plan ({best.goodput_rps if best else 0:.2f} req/s); the config written "
                           "is colocated")
            elif best is not None and best.goodput_rps > 0:
                out.append(f"  verdict: serve disaggregated ({best.goodput_rps:.2f} req/s vs "
                           f"{top.deployment_goodput_rps:.2f} for {top.label})")
    out += _front_end_verdict(outcome, unit)
    s = req.search
    timing = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
    out += ["", f"Search: {len(configs)} configurations per phase, {outcome.num_simulations} "
                f"simulations ({s.num_seeds} seeds x >= {s.num_requests} requests){timing}."]
    return "\n".join(out)
