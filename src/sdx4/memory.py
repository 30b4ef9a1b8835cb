"""`python -m sdx4.memory --size W H --max-memory 5GiB`: a command kept where the README has always put it.
The planner lives in `sdx4.engine.budget`."""

from .engine.budget import main

if __name__ == "__main__":
    raise SystemExit(main())
