"""The paper's small-scale reproductions (``fastgenlabel reproduce``; docs/REPRODUCTION.md).

- :mod:`.datasets`: the synthetic sets and scikit-learn's tabular sets, drawn from seeded generators.
- :mod:`.protocol`: the authors' per-dataset training settings.
- :mod:`.training`: the MLP and the vanilla / mixup / mixup + GenLabel training loop.
- :mod:`.robustness`: robust accuracy under the authors' BoundaryAttack (foolbox) and PGD-Linf.
- :mod:`.plotting`: the decision-boundary figure.
- :mod:`.reproduce`: the command line, the table and the JSON.

Needs scikit-learn and matplotlib (the ``experiments`` extra), and foolbox for the decision-based
attack (the ``robust`` extra); importing this package imports none of them.
"""
