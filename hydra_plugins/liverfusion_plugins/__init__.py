"""liverfusion's Hydra plugins: the config search path (``searchpath``) and the Optuna sweeper (``optuna_sweeper``).

Hydra finds plugins in the ``hydra_plugins`` namespace package and imports every module of it for every Hydra app,
so these modules import nothing heavy at import time and act only on liverfusion's own configs.
"""
