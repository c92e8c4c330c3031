"""Allows `python -m pykine`."""

from pykine.cli import main

if __name__ == "__main__":
    main()
