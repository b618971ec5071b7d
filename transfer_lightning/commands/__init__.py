"""The command line: Lightning's subcommands (:mod:`.cli`), ``lr_find`` (:mod:`.lr_find`), ``sweep``
(:mod:`.sweep`), and the entry point that dispatches every subcommand (:mod:`.main`)."""
