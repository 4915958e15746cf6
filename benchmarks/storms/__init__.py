"""The failure-mode benchmarks of orchestra, one *storm* per multi-agent failure mode, a file
each: ``loop.py``, ``budget.py``, ``conflict.py``, ``approval.py``. ``__main__.py`` runs them;
see its docstring and ``benchmarks/README.md``."""
