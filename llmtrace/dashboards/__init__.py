"""Dashboards and SLO rules generated as code.

The dashboard generators need grafana-foundation-sdk (the ``dashboards``
extra); the SLO rules generator needs only the core dependencies.
"""

#: how to get the optional dependency of the dashboard generators
DASHBOARDS_EXTRA = "pip install 'llmtrace-otel[dashboards]'"


def in_checkout() -> bool:
    """True when running from a source checkout, whose dashboards/ the generators update.

    Installed from a wheel there is no default output directory: the generators
    ask for ``--out`` rather than write into site-packages.
    """
    from pathlib import Path

    return (Path(__file__).resolve().parents[2] / "semconv" / "registry").is_dir()
