"""Test-wide settings: the package under test is imported from src/ via the editable install."""
