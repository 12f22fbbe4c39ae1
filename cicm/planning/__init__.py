"""The plain nightly pipeline: ingestion, carbon, SLO feedback, models, programs and the store writes (``plan_day``
in :mod:`cicm.planning.pipeline`). No Prefect: the flows in the top-level ``flows/`` package wrap it."""
