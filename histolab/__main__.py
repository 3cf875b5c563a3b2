"""``python -m histolab``: see histolab/cli/."""

from histolab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
