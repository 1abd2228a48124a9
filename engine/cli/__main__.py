"""`python -m engine.cli ARGS...`: the `fusenet` command without the installed script."""
import sys

from engine.cli.main import main

sys.exit(main())
