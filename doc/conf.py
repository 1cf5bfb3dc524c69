"""Sphinx configuration for the usercouch documentation (built-in extensions only)."""

from __future__ import annotations

import os
import sys

# Document (and doctest) the usercouch of this checkout, installed or not.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import usercouch  # noqa: E402

project = "usercouch"
author = "the usercouch authors"
copyright = "the usercouch authors; LGPL-3.0-or-later"
version = release = usercouch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# The tutorial's examples start real servers with the engine the test suite would use
# (USERCOUCH_ENGINE, else auto-detection). `:skipif:` blocks can test `engine_name`.
doctest_global_setup = """
from usercouch.engines import get_engine as _get_engine
engine_name = _get_engine(None).name
"""
