"""The demo: readers of the bundled real traces (``traces``), the demo fleet's telemetry derived from them
(``telemetry``) and generated fleets of any size (``scale_fleet``). The datasets themselves are package data in
``data/`` (sources and licences: ``data/SOURCES.md``)."""
