"""Effects that can be interrupted at any instant and simply done again.

files.py    atomic writes, repeatable moves, stale temp files
actions.py  how a post-commit action and its path are stored in the ledger
"""
