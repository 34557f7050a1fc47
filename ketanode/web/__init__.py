"""The read-only dashboard, ``/metrics`` and ``/health``, served over HTTP(S) by the node.

``app.py`` builds the FastAPI application, ``server.py`` runs it (uvicorn in a thread of the
node), ``auth.py`` holds logins and sessions, ``pages.py`` the dashboard pages,
``plots.py`` the server-side SVG figures, ``metrics.py`` the Prometheus collector and
``health.py`` the health check. Research use only.
"""
