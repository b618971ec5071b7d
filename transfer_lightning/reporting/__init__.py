"""``report``: finished runs read back from their event files (:mod:`.runs`), as a table, a plot and one
self-contained HTML page (:mod:`.html`), by the command (:mod:`.command`)."""
