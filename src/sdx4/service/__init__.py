"""The HTTP service: `requests` (what it accepts, checked before queueing), `jobs` (the queue and the one
worker that owns the model), `app` (the FastAPI routes and the uvicorn runner), `static/` (the web page).

Nothing here is imported by `import sdx4`; `sdx4 serve` imports it (and FastAPI) when it starts."""
