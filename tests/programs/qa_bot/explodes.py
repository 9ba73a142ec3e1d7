"""A module that raises while it is imported."""

raise ImportError("this module cannot be imported: a dependency is missing")
