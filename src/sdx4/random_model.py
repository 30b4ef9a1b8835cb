"""`python -m sdx4.random_model DIR --size tiny|full`: a command kept where the README has always put it.
The code lives in `sdx4.model.random_model`."""

from .model.random_model import main

if __name__ == "__main__":
    raise SystemExit(main())
