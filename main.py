"""`python main.py ...` is the `minillm` command (for a checkout without `pip install`)."""

from minillm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
