"""Where inputs come from: a directory or an object-store prefix (see :mod:`.base`).

Only :mod:`.url` is imported by the package's configuration; the object-store modules
(:mod:`.store`, :mod:`.objects`, :mod:`.effects`) load obstore when, and only when, an
``s3://`` location is used.
"""
