"""Dashboards and SLO rules generated as code."""
