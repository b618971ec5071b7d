"""``python -m transfer_lightning fit --config configs/<x>.yaml``."""

from transfer_lightning.cli import main

if __name__ == "__main__":
    main()
