"""Effects that can be interrupted at any instant and simply done again.

files.py    atomic writes, repeatable moves, stale temp files
"""
