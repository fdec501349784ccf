"""``python -m producers.engine ...``: start the embedded engine (see ``producers.engine.server``).

What/why: a thin entry point so the launcher can start engines as plain subprocesses; all
options are documented by ``python -m producers.engine --help``.
"""

import sys

from producers.engine.server import main

if __name__ == "__main__":
    sys.exit(main())
