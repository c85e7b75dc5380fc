"""`mamba2 serve`: an OpenAI-compatible HTTP server over one model.

    app.py           the FastAPI application: endpoints, API key, body cap, OpenAI error objects
    schemas.py       the request and response bodies (pydantic)
    scheduler.py     the thread that owns the model: admission, the batched decode, cancellation
    prefix_cache.py  the exact prefix-state cache (LRU keyed by token ids)
    defaults.py      the sampling defaults a request falls back on
    client.py        the client side of `mamba2 run/chat --server` (standard library only)

Only app.py needs the `serve` extra (FastAPI, uvicorn); client.py imports nothing beyond
the standard library, so `--server` works from a bare install.
"""
