"""`python -m syncd`: the command line's entry point; runs `syncd.cli.main` and exits with its code."""

from syncd.cli import main

raise SystemExit(main())
