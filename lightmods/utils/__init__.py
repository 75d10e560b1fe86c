"""Small helpers: the run-directory writer."""
