"""Telemetry from a Prometheus server: PromQL range queries over its HTTP API into the Parquet drop's frames.

:func:`read_prometheus_telemetry` evaluates one PromQL query per series and cluster (or power domain) with
``GET {base_url}/api/v1/query_range`` at a 1-hour step over ``[start, end)``, through
:func:`cicm.httpclient.make_session` (retries with back-off, a timeout on every request), and returns
``(usage, power)`` with exactly the columns of the Parquet/CSV drop (``USAGE_FILE_COLUMNS`` and
``POWER_FILE_COLUMNS`` in :mod:`cicm.telemetry_sources.schema`): one row per cluster (domain) and UTC hour, the hour being the
hour's start.

Mapping (:class:`PrometheusMapping`). Each series is a PromQL query template; ``{cluster}`` and ``{domain}`` are
replaced by the cluster's and power domain's names (escaped for a double-quoted PromQL string; every other brace
is PromQL's own). A template must return ONE series per cluster (domain) in the unit of its column: CPU cores
(an hour's mean), core-hours per hour for arrivals, kW for power. Each series says which hour a value belongs to:

* ``hour = "end"`` (the default): the value evaluated at T is the hour that ENDS at T, right for windowed
  queries such as ``avg_over_time(m[1h])``, ``increase(c[1h])``, ``rate(c[1h]) * 3600``;
* ``hour = "start"``: the value evaluated at T is the hour that STARTS at T, right for a gauge recorded once an
  hour and stamped with the hour's start (a recording rule, or backfilled hourly data).

Label conventions (the defaults): every metric carries ``cluster="<fleet-file cluster name>"``; power-domain
metrics also carry ``domain="<power-domain name>"``. Gauges ``cicm_inflexible_cpu_cores``,
``cicm_flexible_cpu_cores``, ``cicm_reserved_cpu_cores``, ``cicm_domain_cpu_cores``, ``cicm_domain_power_watts``
(base unit, divided by 1000 in the default query) and, when flexible arrivals are exported, the counter
``cicm_flexible_arrived_core_hours_total``. Any other names work: write the queries.

Handling (also in docs/telemetry.md):

* **Gaps.** An hour where a query has no sample is a missing row: nothing is interpolated or filled. A usage row
  needs every usage series in that hour, a power row both of its domain's series; an hour missing one of them is
  left out (``usage.attrs["missing_hours"]`` / ``power.attrs["missing_hours"]`` count the hours left out per
  cluster / domain). A series with fewer than ``min_coverage`` of the window's hours raises InputError naming
  its field.
* **Counter resets.** A mapping that reads a counter wraps it in ``increase()`` or ``rate()``; Prometheus
  corrects resets there (a drop is taken as a restart from zero). This reader does no counter arithmetic.
* **Stale series.** When a series' newest hour ends more than ``max_age_hours`` before ``end`` (Prometheus
  marks a series that stopped reporting stale, so it yields no samples after that), InputError names the field,
  the cluster (domain) and the newest hour.
* **Duplicate samples.** Prometheus returns at most one sample per series and step. If a query returns several
  series for one cluster (domain), e.g. two scrape jobs or instances exporting the same ``cluster`` label,
  InputError names the field, the query and each series' labels: aggregate in the query (``sum``, ``max``) or
  narrow its labels.
* **Bad values.** A NaN, infinite or negative value raises InputError naming the field, the hour and the
  cluster (domain).
* **Empty.** A query that returns no series at all over the window raises InputError naming the field.
* **HTTP.** Connection errors, timeouts and non-2xx responses (after the session's retries) raise ProviderError
  naming the URL; so do a request that passes the session's overall deadline (60 s per query by default, retries
  and body included: :class:`cicm.httpclient.DeadlineSession`), a body larger than 20 MB, and a body that is not
  bounded JSON (:func:`cicm.jsonsafe.loads_bounded`: too deep, a 400-digit number); a query Prometheus rejects as malformed (HTTP 400, ``bad_data``) raises InputError naming the
  field, since the mapping is wrong, not the server.

Flexible arrivals are optional: without a query, ``flexible_arrived_core_hours`` is the served flexible work of
the same hour (``flexible_cpu_cores`` × 1 h), the run-on-arrival reading, which only holds for history before
cicm shaped the cluster; ``usage.attrs["arrivals"]`` says ``"flexible_cpu_cores"`` then (``"query"`` otherwise).

Requests: one range query per series and cluster (domain), split into pieces of at most ``MAX_POINTS`` hours
(Prometheus refuses more than 11,000 points per series).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cicm.errors import InputError, ProviderError
from cicm.telemetry_sources.schema import POWER_FILE_COLUMNS, USAGE_FILE_COLUMNS
from cicm.httpclient import make_session, read_body, session_timeout_s, transport_problem
from cicm.jsonsafe import MAX_BYTES, JSONRejected, loads_bounded

__all__ = ["MAX_POINTS", "PrometheusMapping", "SeriesQuery", "parse_mapping", "read_prometheus_telemetry", "render"]

PROVIDER = "prometheus"
HOUR = pd.Timedelta(hours=1)
#: Hours per range request (Prometheus allows at most 11,000 points per series and query).
MAX_POINTS = 10_000

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
CLUSTER_FIELDS = ("inflexible_cpu_cores", "flexible_cpu_cores", "reserved_cpu_cores", "flexible_arrived_core_hours")
DOMAIN_FIELDS = ("domain_cpu_cores", "power_kw")
#: Mapping field -> column of the drop it fills.
COLUMN = {**{f: f for f in CLUSTER_FIELDS}, "domain_cpu_cores": "cpu_cores", "power_kw": "power_kw"}


class SeriesQuery(BaseModel):
    """One series: a PromQL query template and which hour its value at evaluation time T belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    query: str = Field(min_length=1, description="PromQL with {cluster} (and {domain}) placeholders")
    hour: Literal["start", "end"] = Field(
        default="end", description="end: the value at T is the hour ending at T (avg_over_time, increase); "
                                   "start: the hour starting at T (hourly gauges stamped at the hour's start)")


def _default(query: str) -> SeriesQuery:
    return SeriesQuery(query=query, hour="end")


class PrometheusMapping(BaseModel):
    """Which PromQL query gives each telemetry series, and how strict the reader is.

    A field may be given as a plain string (a query, ``hour = "end"``) or as ``{query, hour}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    inflexible_cpu_cores: SeriesQuery = _default('avg_over_time(cicm_inflexible_cpu_cores{cluster="{cluster}"}[1h])')
    flexible_cpu_cores: SeriesQuery = _default('avg_over_time(cicm_flexible_cpu_cores{cluster="{cluster}"}[1h])')
    reserved_cpu_cores: SeriesQuery = _default('avg_over_time(cicm_reserved_cpu_cores{cluster="{cluster}"}[1h])')
    flexible_arrived_core_hours: SeriesQuery | None = Field(
        default=None, description="e.g. increase(cicm_flexible_arrived_core_hours_total{cluster=\"{cluster}\"}[1h]); "
                                  "None: the served flexible core-hours of the hour (run on arrival)")
    domain_cpu_cores: SeriesQuery = _default(
        'avg_over_time(cicm_domain_cpu_cores{cluster="{cluster}",domain="{domain}"}[1h])')
    power_kw: SeriesQuery = _default(
        'avg_over_time(cicm_domain_power_watts{cluster="{cluster}",domain="{domain}"}[1h]) / 1000')
    max_age_hours: int = Field(default=3, ge=0, description="a series whose newest hour ends more than this "
                                                            "before the window's end is stale")
    min_coverage: float = Field(default=0.5, gt=0, le=1, description="least share of the window's hours a "
                                                                     "series must have")

    @field_validator(*CLUSTER_FIELDS, *DOMAIN_FIELDS, mode="before")
    @classmethod
    def _plain_query(cls, value: Any) -> Any:
        return {"query": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _placeholders(self) -> "PrometheusMapping":
        for name in (*CLUSTER_FIELDS, *DOMAIN_FIELDS):
            series = getattr(self, name)
            if series is None:
                continue
            found = set(_PLACEHOLDER.findall(series.query))
            allowed = {"cluster"} if name in CLUSTER_FIELDS else {"cluster", "domain"}
            unknown = sorted(found - allowed)
            if unknown:
                raise ValueError(f"{name}: unknown placeholder {{{unknown[0]}}} (allowed: "
                                 f"{', '.join('{' + a + '}' for a in sorted(allowed))})")
            needed = "cluster" if name in CLUSTER_FIELDS else "domain"
            if needed not in found:
                raise ValueError(f"{name}: the query must contain {{{needed}}}")
        return self


def _promql_string(value: str) -> str:
    """``value`` escaped for the inside of a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(template: str, cluster: str, domain: str | None = None) -> str:
    """The template with ``{cluster}`` / ``{domain}`` replaced (escaped); PromQL's own braces stay."""
    names = {"cluster": cluster, "domain": domain}

    def sub(match: re.Match[str]) -> str:
        value = names.get(match.group(1))
        return match.group(0) if value is None else _promql_string(value)

    return _PLACEHOLDER.sub(sub, template)


def _utc_hour(value: Any, name: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise InputError(name, f"not a timestamp: {value!r}") from exc
    if stamp is pd.NaT or stamp.tzinfo is None:
        raise InputError(name, f"must be a tz-aware timestamp, got {value!r}")
    stamp = stamp.tz_convert("UTC")
    if stamp != stamp.floor("h"):
        raise InputError(name, f"must start on a whole hour, got {stamp}")
    return stamp


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _labels(metric: Mapping[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"


class _Reader:
    def __init__(self, base_url: str, mapping: PrometheusMapping, session: requests.Session,
                 start: pd.Timestamp, end: pd.Timestamp) -> None:
        self.url = base_url.rstrip("/") + "/api/v1/query_range"
        self.mapping = mapping
        self.session = session
        self.max_bytes = int(getattr(session, "max_body_bytes", MAX_BYTES))
        self.start, self.end = start, end
        self.n_hours = int((end - start) / HOUR)

    def _get(self, field: str, query: str, first: pd.Timestamp, last: pd.Timestamp) -> list[dict]:
        """The result series of one range query evaluated at first, first + 1 h, ..., last."""
        params = {"query": query, "start": str(int(first.timestamp())), "end": str(int(last.timestamp())),
                  "step": "3600"}
        try:
            response = self.session.get(self.url, params=params, stream=True)
            raw = read_body(response, self.max_bytes)  # within the call's deadline, at most max_bytes
        except requests.RequestException as exc:
            problem = transport_problem(exc, session_timeout_s(self.session, self.url))
            status = getattr(exc, "status", None)
            raise ProviderError(PROVIDER, f"GET {self.url} ({field}): {problem}", status) from exc
        text = raw.decode("utf-8", "replace")
        try:
            body = loads_bounded(raw, "response body", max_bytes=self.max_bytes)
        except JSONRejected as exc:
            if 200 <= response.status_code < 300:
                raise ProviderError(PROVIDER, f"GET {self.url} ({field}): {exc.field}: {exc.message}",
                                    response.status_code) from exc
            body = None
        if not 200 <= response.status_code < 300:
            if response.status_code == 400 and isinstance(body, dict) and body.get("errorType") == "bad_data":
                raise InputError(field, f"Prometheus at {self.url} rejected the query {query!r}: "
                                        f"{body.get('error', '')}")
            raise ProviderError(PROVIDER, f"GET {self.url} ({field}, query {query!r}) failed: "
                                          f"{_short(text)}", response.status_code)
        if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
            raise ProviderError(PROVIDER, f"GET {self.url} ({field}): not a successful Prometheus answer: "
                                          f"{_short(text)}", response.status_code)
        data = body["data"]
        if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
            raise ProviderError(PROVIDER, f"GET {self.url} ({field}): expected a matrix, got "
                                          f"{data.get('resultType')!r}", response.status_code)
        return data["result"]

    def series(self, field: str, spec: SeriesQuery, cluster: str, domain: str | None = None) -> pd.Series:
        """One field's hourly values for a cluster (domain), indexed by the hour's start (UTC); checked."""
        query = render(spec.query, cluster, domain)
        who = f"cluster {cluster!r}" if domain is None else f"domain {domain!r} of cluster {cluster!r}"
        shift = HOUR if spec.hour == "end" else pd.Timedelta(0)
        values: dict[pd.Timestamp, float] = {}
        for offset in range(0, self.n_hours, MAX_POINTS):
            first = self.start + offset * HOUR
            last = self.start + (min(offset + MAX_POINTS, self.n_hours) - 1) * HOUR
            result = self._get(field, query, first + shift, last + shift)
            if len(result) > 1:
                labels = "; ".join(_labels(s.get("metric") or {}) for s in result[:5])
                raise InputError(field, f"the query {query!r} returned {len(result)} series for {who} (one "
                                        f"expected: aggregate it or narrow its labels): {labels}")
            for point in (result[0].get("values") or []) if result else []:
                try:
                    stamp = pd.Timestamp(float(point[0]), unit="s", tz="UTC")
                    value = float(point[1])
                except (TypeError, ValueError, IndexError) as exc:
                    raise ProviderError(PROVIDER, f"GET {self.url} ({field}): bad sample {point!r}") from exc
                hour = stamp - shift
                if hour != hour.floor("h"):
                    raise ProviderError(PROVIDER, f"GET {self.url} ({field}): sample off the hourly grid at {stamp}")
                if not math.isfinite(value):
                    raise InputError(field, f"{point[1]} at hour {hour.isoformat()} for {who} (query {query!r})")
                if value < 0:
                    raise InputError(field, f"negative value {value:g} at hour {hour.isoformat()} for {who} "
                                            f"(query {query!r})")
                values[hour] = value
        if not values:
            raise InputError(field, f"the query {query!r} returned nothing for {who} in "
                                    f"[{self.start.isoformat()}, {self.end.isoformat()}) from {self.url}")
        series = pd.Series(values, dtype=float).sort_index()
        newest_end = series.index[-1] + HOUR
        if self.end - newest_end > pd.Timedelta(hours=self.mapping.max_age_hours):
            raise InputError(field, f"stale series for {who}: its newest sample is for hour "
                                    f"{series.index[-1].isoformat()}, {int((self.end - newest_end) / HOUR)} h before "
                                    f"the window's end {self.end.isoformat()} (max_age_hours = "
                                    f"{self.mapping.max_age_hours}; query {query!r})")
        self.check_coverage(field, len(series), who, f"query {query!r}")
        return series

    def check_coverage(self, field: str, hours: int, who: str, what: str) -> None:
        needed = math.ceil(self.mapping.min_coverage * self.n_hours)
        if hours < needed:
            raise InputError(field, f"too few hours for {who}: {hours} of {self.n_hours} in "
                                    f"[{self.start.isoformat()}, {self.end.isoformat()}), at least {needed} needed "
                                    f"(min_coverage = {self.mapping.min_coverage:g}; {what})")


def _joined(reader: _Reader, columns: dict[str, pd.Series], fields: dict[str, str], who: str) -> pd.DataFrame:
    """The hours every series has (inner join), coverage checked; raises naming the thinnest series."""
    frame = pd.concat(columns, axis=1, join="inner").sort_index()
    if len(frame) < math.ceil(reader.mapping.min_coverage * reader.n_hours):
        thinnest = min(columns, key=lambda c: len(columns[c]))
        reader.check_coverage(fields[thinnest], len(frame), who, "hours where every series has a sample")
    return frame


def parse_mapping(raw: Mapping[str, Any]) -> PrometheusMapping:
    """A mapping from plain data (a fleet file's table); a bad one raises InputError naming
    ``prometheus.<field>``."""
    try:
        return PrometheusMapping.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()) if not isinstance(part, int))
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        if not loc and ":" in message:  # the placeholder check names its field in its message
            loc, message = (part.strip() for part in message.split(":", 1))
        raise InputError(f"prometheus.{loc}" if loc else "prometheus", message) from exc


def read_prometheus_telemetry(
    base_url: str,
    mapping: PrometheusMapping | Mapping[str, Any] | None,
    clusters: Mapping[str, list[str]],
    start: Any,
    end: Any,
    session: requests.Session | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Usage and power telemetry of ``clusters`` (cluster -> its power domains) over the UTC hours [start, end).

    Returns ``(usage, power)`` with exactly ``USAGE_FILE_COLUMNS`` / ``POWER_FILE_COLUMNS``, hours as UTC
    timestamps of the hour's start, sorted by cluster (domain) and hour; missing hours are missing rows. Raises
    InputError (naming the field) for bad mappings, windows and data, ProviderError (naming the URL) when
    Prometheus cannot be asked. Without ``session``, one from :func:`cicm.httpclient.make_session` is used.
    """
    if mapping is None:
        mapping = PrometheusMapping()
    elif not isinstance(mapping, PrometheusMapping):
        mapping = parse_mapping(mapping)
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/]", base_url):
        raise InputError("base_url", f"must be an http(s) URL, got {base_url!r}")
    start, end = _utc_hour(start, "start"), _utc_hour(end, "end")
    if end <= start:
        raise InputError("end", f"must be after start ({start.isoformat()}), got {end.isoformat()}")
    if not clusters:
        raise InputError("clusters", "no clusters to read")
    seen: dict[str, str] = {}
    for cluster, domains in clusters.items():
        if not isinstance(cluster, str) or not cluster:
            raise InputError("cluster", f"must be non-empty text, got {cluster!r}")
        for domain in domains:
            if not isinstance(domain, str) or not domain:
                raise InputError("domain", f"must be non-empty text, got {domain!r} (cluster {cluster!r})")
            if domain in seen:
                raise InputError("domain", f"{domain!r} is in both {seen[domain]!r} and {cluster!r} (power rows "
                                           "are keyed by domain and hour)")
            seen[domain] = cluster

    own_session = session is None
    http = make_session() if session is None else session
    try:
        reader = _Reader(base_url, mapping, http, start, end)
        usage_frames, power_frames = [], []
        usage_missing: dict[str, int] = {}
        power_missing: dict[str, int] = {}
        for cluster, domains in clusters.items():
            who = f"cluster {cluster!r}"
            fields = {f: f for f in CLUSTER_FIELDS if getattr(mapping, f) is not None}
            columns = {f: reader.series(f, getattr(mapping, f), cluster) for f in fields}
            frame = _joined(reader, columns, fields, who)
            if mapping.flexible_arrived_core_hours is None:  # run on arrival: 1 h of the served cores
                frame["flexible_arrived_core_hours"] = frame["flexible_cpu_cores"] * 1.0
            frame.insert(0, "cluster", cluster)
            usage_frames.append(frame)
            usage_missing[cluster] = reader.n_hours - len(frame)
            for domain in domains:
                fields = {COLUMN[f]: f for f in DOMAIN_FIELDS}
                columns = {COLUMN[f]: reader.series(f, getattr(mapping, f), cluster, domain) for f in DOMAIN_FIELDS}
                frame = _joined(reader, columns, fields, f"domain {domain!r} of cluster {cluster!r}")
                frame.insert(0, "domain", domain)
                frame.insert(0, "cluster", cluster)
                power_frames.append(frame)
                power_missing[domain] = reader.n_hours - len(frame)
    finally:
        if own_session:
            http.close()

    usage = _finish(usage_frames, USAGE_FILE_COLUMNS)
    power = _finish(power_frames, POWER_FILE_COLUMNS)
    usage.attrs.update(missing_hours=usage_missing,
                       arrivals="query" if mapping.flexible_arrived_core_hours is not None else "flexible_cpu_cores")
    power.attrs.update(missing_hours=power_missing)
    return usage, power


def _finish(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    if not frames:
        empty = pd.DataFrame({c: pd.Series(dtype=object if c in ("cluster", "domain") else float) for c in columns})
        empty["hour"] = pd.Series(dtype="datetime64[ns, UTC]")
        return empty[list(columns)]
    frame = pd.concat([f.rename_axis("hour").reset_index() for f in frames], ignore_index=True)
    frame["hour"] = pd.to_datetime(frame["hour"], utc=True).astype("datetime64[ns, UTC]")
    for column in columns:
        if column not in ("cluster", "domain", "hour"):
            frame[column] = frame[column].to_numpy(dtype=np.float64)
    keys = ["cluster", "domain", "hour"] if "domain" in columns else ["cluster", "hour"]
    return frame[list(columns)].sort_values(keys, kind="stable").reset_index(drop=True)
