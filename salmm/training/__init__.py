"""Training: the recipe (:mod:`.config`), processes and threads (:mod:`.runtime`), inputs checked
before any step (:mod:`.inputs`), the loss and one epoch (:mod:`.loop`), the run folder's records
(:mod:`.records`), the run top to bottom (:mod:`.trainer`)."""
