"""``python -m transfer_lightning fit --config configs/<x>.yaml``."""

from transfer_lightning.commands.main import main

if __name__ == "__main__":
    main()
