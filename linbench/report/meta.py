"""What the report reads of the plugins' own metadata, as the runner copied it into records:
a method's `method_role` and a suite's `suite_meta` (see linbench.suites.base.Suite.meta).
"""
from __future__ import annotations

ROLES = ("parent", "baseline")  # first rows, in this order; every other role follows by name
# an undeclared metric: a plain value of unknown direction (compared as a percentage)
DEFAULT_SPEC = {"label": None, "higher_is_better": None, "chance": None, "kind": "value",
                "note": None, "derived": None}


def role_rank(role: str | None) -> int:
    """parent 0, baseline 1, anything else (linearized, peer, unknown) 2."""
    return ROLES.index(role) if role in ROLES else len(ROLES)


def row_rank(record: dict) -> tuple[int, str]:
    """The order of rows: parent first, baselines next, then every other method by name."""
    return role_rank(record.get("method_role")), record.get("method") or ""


def suite_meta(record: dict) -> dict:
    return record.get("suite_meta") or {}


def specs(meta: dict) -> dict[str, dict]:
    """{metric name: spec} in the suite's declared order."""
    return {m["name"]: m for m in meta.get("metrics") or [] if m.get("name")}


def spec(meta: dict, name: str) -> dict:
    """The declared spec of one metric, completed with DEFAULT_SPEC."""
    found = specs(meta).get(name) or {}
    out = {**DEFAULT_SPEC, **found, "name": name}
    out["label"] = out["label"] or name
    return out


def metric_order(meta: dict, present) -> list[str]:
    """The present metrics: the declared ones in their order, then the rest by name."""
    present = set(present)
    declared = [m for m in specs(meta) if m in present]
    return declared + sorted(present - set(declared))


def derived(meta: dict) -> list[dict]:
    """The declared derived metrics: [{"name", "mean_of": [...], "plus": [{suite, metric}]}]."""
    return [{"name": m["name"], **m["derived"]} for m in specs(meta).values()
            if m.get("derived") and m["derived"].get("mean_of")]


def lower_is_better(spec: dict) -> bool:
    """Only a metric declared so: its comparison with the parent is a ratio."""
    return spec.get("higher_is_better") is False


def primary(meta: dict, names: list[str]) -> str | None:
    """The metric a quality plot shows: the suite's primary one, else the first column."""
    want = meta.get("primary")
    return want if want in names else (names[0] if names else None)
