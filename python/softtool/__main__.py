"""`python -m softtool` runs the same command line as `softtool`."""

from softtool.cli import main

if __name__ == "__main__":
    main()
