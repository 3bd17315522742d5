"""HTTP with idempotency keys, both sides.

client.py      ctx.http: Idempotency-Key on unsafe calls, retries that reuse the key
middleware.py  IdempotencyMiddleware: the receiving side, over the ledger's store
responder.py   one keyed request the middleware serves: run once, response stored, then sent
request.py     the key header, the caller's namespace, fingerprints, problem responses
"""
