"""Glue for frameworks (Django, Flask, FastAPI...). Each module imports its framework
only when used, so none is a dependency of Soniq itself."""
