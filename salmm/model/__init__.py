"""The model: SalM² (:mod:`.net`), its bidirectional Mamba (:mod:`.mamba`), the selective scan
(:mod:`.scan`, with its ``_ref`` twin, and the numba CPU kernel :mod:`.scan_cpu`), devices and
autocast (:mod:`.devices`), and the formats weights live in (:mod:`.checkpoint`, the authors'
``model_best_*.tar``: :mod:`.official`)."""
