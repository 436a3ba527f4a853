"""Helpers shared by several test files, imported as ``helpers.<module>`` (``tests/`` is on pytest's pythonpath).

Test files never import each other: what two of them need lives here (``serving``: an exported tiny DAE, heads
and a server process; ``training``: the trainer's tiny arguments and a subprocess run). Fixtures shared by
several files are in ``tests/conftest.py``.
"""
