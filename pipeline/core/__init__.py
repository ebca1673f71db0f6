"""Core: what every command leans on and no dataset knows of.

Errors printed as one line (:mod:`.errors`), atomic writes and locks (:mod:`.fsio`), CPU threads
and the load governor (:mod:`.cpu`), progress bars (:mod:`.progress`), small pipeline stages
(:mod:`.pipes`), the Dask cluster (:mod:`.dask_cluster`). Imports nothing else of the project.
"""
