"""Test programs: DSPy modules as users write them (served by tests/integration/test_programs.py)."""
