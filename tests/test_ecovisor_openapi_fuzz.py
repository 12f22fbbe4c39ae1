"""Schemathesis over the ecovisor's OpenAPI (issue 20, item 7), against a real ecovisor on loopback (uvicorn in a
thread; the app's lifespan runs once) and bounded: a few derandomized examples per operation, valid and invalid. Every answer must be documented (status, content type, body schema), no input
may cause a 5xx, and what the schema forbids (a string for a number, a boolean, a timestamp without a zone, an
out-of-range value, an extra field) must be refused. Checks left out: ``positive_data_acceptance``, because a
schema-valid value can still break a rule that depends on the site (a cap above the container's max power is
422 by design)."""
from __future__ import annotations

import warnings

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from cicm.ecovisor.schemas import AppRegistration  # noqa: E402
from cicm.ecovisor.testing import ServerThread, simulated_app  # noqa: E402

EXAMPLES = 12  # per operation and test: ~30 operations in all, well under 30 s


def _ecovisor():
    api = simulated_app(admin_token="fuzz-admin")
    core = api.state.ecovisor
    _, token = core.register_app(AppRegistration(name="fuzz", grid_kw=5.0, solar_fraction=0.5, battery_fraction=0.5,
                                                 containers=["a-batch", "a-serve"]))
    core.advance(2)
    return api, token


API, APP_TOKEN = _ecovisor()
schema = schemathesis.openapi.from_dict(API.openapi())
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    with ServerThread(API) as srv:
        yield srv


def _call(case, url: str, token: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"},
                               excluded_checks=[positive_data_acceptance], timeout=30)


# the admin's DELETE and token rotation would remove or lock out the app the other test fuzzes with
@schema.include(tag="admin").exclude(method="DELETE").exclude(path="/v1/apps/{name}/token").parametrize()
@FUZZ
def test_admin_routes(case, server):
    _call(case, server.url, "fuzz-admin")


# the event stream of an accepted request never ends (tests/test_ecovisor_events.py checks its answers)
@schema.exclude(tag="admin").exclude(path="/metrics").exclude(path="/v1/apps/{name}/events").parametrize()
@FUZZ
def test_app_routes(case, server):
    _call(case, server.url, APP_TOKEN)
