"""Prefect flows. Importing this package configures Prefect to run offline on its ephemeral server."""
from flows.prefect_env import configure_prefect

configure_prefect()
