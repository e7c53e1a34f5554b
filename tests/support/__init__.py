"""What the tests share: factories and helpers imported by name (``tests.support.node``,
``tests.support.tiny_model``, ``tests.support.shared``) and the fixtures of every folder
(``tests.support.fixtures``, registered in ``tests/conftest.py``)."""
