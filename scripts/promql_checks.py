"""PromQL checks shared by scripts/check-deploy-overlay (alert rules) and
scripts/check-dashboards (panel queries): gauges that every replica reports must be combined
across replicas with max before anything else."""
import re

AGGREGATIONS = "sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values"
# Gauges every replica reports for the same topic, tier or partition (a replica measures whole
# DLQ and retry topics; a partition's lag may still be reported by the replica that lost it).
REPLICATED_GAUGES = ("orderflow_dlq_depth", "orderflow_dlq_oldest_age_seconds", "orderflow_retry_backlog", "orderflow_consumer_lag")


def innermost_aggregation(expr, at):
    """The aggregation operator (and its `by` labels, or None) that first encloses position
    `at` of a PromQL expression, skipping function calls such as delta( or rate(."""
    depth, i = 0, at - 1
    while i >= 0:
        c = expr[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth == 0:
                before = expr[:i]
                m = re.search(rf"\b({AGGREGATIONS})\s*(?:(by|without)\s*\(([^()]*)\))?\s*$", before)
                if m:
                    labels = [x.strip() for x in m.group(3).split(",")] if m.group(2) == "by" else None
                    return m.group(1), labels
            else:
                depth -= 1
        i -= 1
    return None, None


def replicated_gauge_problems(where, expr):
    out = []
    for g in REPLICATED_GAUGES:
        for m in re.finditer(rf"\b{g}\b", expr):
            op, _ = innermost_aggregation(expr, m.start())
            if op not in ("max", "min"):
                out.append(f"{where}: {g} is reported by every replica: combine the replicas with max (by the "
                           f"labels that identify it) before anything else, not {op or 'no aggregation'}: {expr}")
    return out
