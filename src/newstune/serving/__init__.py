"""Serving: the HTTP service and its page.

Owns loading runs for serving with shared frozen weights, the micro-batcher, the FastAPI app and its guards on
request bodies (`guard`), and the browser page. It reads runs through `newstune.rundir`; it trains nothing.
May import: the leaves, `data`, `modeling`, `decisions`, `rundir`.
"""
