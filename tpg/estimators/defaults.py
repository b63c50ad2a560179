"""Estimator defaults the command line shows, in a module free of torch (re-exported by
:mod:`.plugin`, where they are documented)."""

#: Seconds a plug-in's import or one call may take (``tpg verify --plugin-timeout``).
DEFAULT_TIMEOUT = 60.0

__all__ = ["DEFAULT_TIMEOUT"]
