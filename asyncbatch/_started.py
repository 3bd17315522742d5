"""When this process began importing asyncbatch (``time.time()``), imported first by the package.

For the command line, that is when its runner started: a shared run goes by a listing that
began then or later (see :mod:`asyncbatch._pipeline.shared`), and taken here, before the
package's imports (a quarter second), runners launched together share one listing more often
than when timed from the start of ``run()``.
"""

import time

imported_at = time.time()
