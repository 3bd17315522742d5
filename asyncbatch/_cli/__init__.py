"""The ``asyncbatch`` command line.

main.py      parsing, the run command, exit codes
operator.py  status, failures, retry, locks, unlock, history
items.py     explain, items, forget: answers about single items
progress.py  a bar on a terminal, lines otherwise
demo.py      make an inbox, run, run again, show the status
help.py      help [TOPIC]: the documentation pages shipped in asyncbatch/docs/
logging.py   text or JSON records on stderr
target.py    TARGET (module:function) to a handler
"""

from .main import main

__all__ = ["main"]
