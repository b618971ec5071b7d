"""``serve``: a trained model behind HTTP on LitServe. Requests (:mod:`.requests`), the LitAPI (:mod:`.api`),
the server and its command line (:mod:`.server`); LitServe itself is imported only by the last two."""
