"""`python -m vitprobe` (and `torchrun -m vitprobe`) entry point."""

from vitprobe.cli import main

if __name__ == "__main__":
    main()
