"""Prefect flows. Importing this package configures Prefect to run offline on its ephemeral server."""
from cicm.flows.prefect_env import configure_prefect

configure_prefect()
