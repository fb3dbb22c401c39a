"""``python -m r2m_fast`` runs the r2m-merge command."""

import sys

from r2m_fast.cli import main

sys.exit(main())
