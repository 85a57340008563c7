"""Dashboards and SLO rules generated as code.

The dashboard generators need grafana-foundation-sdk (the ``dashboards``
extra); the SLO rules generator needs only the core dependencies.
"""

#: how to get the optional dependency of the dashboard generators
DASHBOARDS_EXTRA = "pip install 'llmtrace-otel[dashboards]'"
