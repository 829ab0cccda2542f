"""Dashboard of the job service: live sub-agent graphs, timelines with the critical path, training curves.

`dashboards.app.dashboard_router(settings)` serves the single-page app under /dashboard;
`dashboards.metrics` reads the PARL trainer's metrics.jsonl files (format in docs/dashboard.md).
"""
