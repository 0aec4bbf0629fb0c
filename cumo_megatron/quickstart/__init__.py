"""The quickstart: a complete CuMo run (stages 1, 2, upcycle, 3, evaluation) on tiny assets, on CPU.

``python -m cumo_megatron.quickstart OUT`` (or ``examples/quickstart.sh OUT``) builds everything it
needs locally (`assets`), trains with ``python -m cumo_megatron.train``, answers held-out questions
with ``python -m cumo_megatron.generate`` and scores them (`evaluate`).
"""
