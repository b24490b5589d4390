"""`python -m linbench ...` is the `linbench` command (what torchrun's `-m linbench` runs)."""
from linbench.cli import main

if __name__ == "__main__":
    main()
