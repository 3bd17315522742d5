"""HTTP with idempotency keys, both sides.

client.py      ctx.http: Idempotency-Key on unsafe calls, retries that reuse the key
middleware.py  IdempotencyMiddleware: the receiving side, over the ledger's store
"""
