"""Tests of executor/, one folder per sub-package."""
