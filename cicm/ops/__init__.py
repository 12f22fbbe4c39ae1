"""Operations: what operators run the planner with. Prometheus metrics of the nightly plan (:mod:`.metrics`), the
ecovisor (:mod:`.ecovisor_metrics`) and the enforcement agent (:mod:`.agent_metrics`); docs/metrics.md lists them.

A low layer: it imports nothing from the rest of ``cicm``; the services hand it their state (duck-typed), so the
ecovisor and the agent can both use it.
"""
